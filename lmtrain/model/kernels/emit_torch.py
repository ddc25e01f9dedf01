"""A cell's step (lmtrain.model.cells.equations) as the engine's two Python functions:

    forward_step(xg, hg, state, extra) -> new state, saved
    backward_step(d_state, saved, state, extra) -> d xg, d hg, direct state gradients, extra gradients

(the interface of lmtrain.model.recurrence). They are generated as Python source, one torch
operation per node, and compiled with `compile`/`exec` once per cell: plain functions, so
lmtrain.model.kernels.fused traces and compiles them like hand-written ones, and the engine runs
them without an interpreter's overhead. `source(program)` is the text, for reading.

Shapes: xg, hg (B, GH) with gate k in columns k·H .. (k+1)·H (hg includes b_hh); each state
(B, H); each extra parameter (blocks·H,). saved: the program's saved values (B, H) each, then the
new states the backward reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmtrain.model.cells.equations import Node, Program, Step, render

_CALLS = {"sigmoid": "torch.sigmoid", "tanh": "torch.tanh", "exp": "torch.exp", "log_sigmoid": "F.logsigmoid",
          "maximum": "torch.maximum"}
_SPLIT = "(({a} - {b}).sign() + 1.0) * 0.5"  # 1, 1/2 or 0 as a > b, a = b, a < b: torch.maximum's share


def _name(node: Node) -> str:
    return repr(node.index) if node.op == "const" else f"v{node.id}"


def _assignments(nodes: list[Node], read: Callable[[Node], str | None]) -> list[str]:
    """One line per node: what `read` gives for a value read from the arguments, else its operation."""
    return [f"    v{n.id} = {read(n) or render(n, _name, _CALLS, _SPLIT)}" for n in nodes if n.op != "const"]


def _blocks(program: Program) -> list[tuple[int, int]]:
    """(parameter index, block within it) of each per-unit block p[k]."""
    return [(i, b) for i, blocks in enumerate(program.step.extra.values()) for b in range(len(blocks))]


def _columns(k: int) -> str:
    return f"{k} * H:{k + 1} * H"


def source(program: Program) -> str:
    """The Python text of forward_step and backward_step for `program`."""
    blocks = _blocks(program)
    outputs = {id(n): k for k, n in enumerate(program.outputs)}
    read_outputs = [n for n in program.backward if id(n) in outputs and n.op not in ("s", "p")]
    lines = ["def forward_step(xg, hg, state, extra):", "    H = state[0].size(1)"]

    def parameter(node: Node) -> str:
        i, b = blocks[node.index]
        return f"extra[{i}][{_columns(b)}]"

    forward_reads = {"x": lambda n: f"xg[:, {_columns(n.index)}]", "u": lambda n: f"hg[:, {_columns(n.index)}]",
                     "s": lambda n: f"state[{n.index}]", "p": parameter}
    lines += _assignments(program.forward, lambda n: forward_reads[n.op](n) if n.op in forward_reads else None)

    def own(node: Node) -> str:  # xg and hg are the engine's reused buffers: a pre-activation kept is copied
        return f"{_name(node)}.clone()" if node.op in ("x", "u") else _name(node)

    new_state = ", ".join(own(n) for n in program.outputs)
    kept = ", ".join(own(n) for n in (*program.saved, *read_outputs))
    lines.append(f"    return ({new_state},), ({kept}{',' if kept else ''})")

    saved_index = {id(n): i for i, n in enumerate((*program.saved, *read_outputs))}
    lines += ["", "def backward_step(d_state, saved, state, extra):", "    H = state[0].size(1)"]
    backward_reads = {"s": forward_reads["s"], "p": parameter, "d": lambda n: f"d_state[{n.index}]"}

    def backward_read(node: Node) -> str | None:
        if id(node) in saved_index:
            return f"saved[{saved_index[id(node)]}]"
        return backward_reads[node.op](node) if node.op in backward_reads else None

    lines += _assignments([*program.saved, *(n for n in program.backward if not any(n is m for m in program.saved))],
                          backward_read)

    def gate_grads(grads: list[Node | None]) -> str:
        return "torch.cat([" + ", ".join(_name(g) if g is not None else "torch.zeros_like(state[0])" for g in grads) + "], 1)"

    lines.append(f"    d_xg = {gate_grads(program.d_x)}")
    lines.append(f"    d_hg = {'d_xg' if program.shared_gradient else gate_grads(program.d_u)}")
    direct = [_name(g) if g is not None else ("None" if k == 0 else f"torch.zeros_like(state[{k}])")
              for k, g in enumerate(program.d_s)]
    extras = []
    for i in range(len(program.step.extra)):
        parts = [(_name(program.d_p[k]) + ".sum(0)") if program.d_p[k] is not None else "extra[%d].new_zeros(H)" % i
                 for k, (param, _) in enumerate(blocks) if param == i]
        extras.append("torch.cat([" + ", ".join(parts) + "])")
    lines.append(f"    return d_xg, d_hg, ({', '.join(direct)},), ({', '.join(extras)}{',' if extras else ''})")
    return "\n".join(lines) + "\n"


def steps(program: Program, name: str) -> tuple[Callable, Callable]:
    """forward_step and backward_step of `program`, compiled from `source` (name: the cell's, for
    tracebacks and profiles)."""
    namespace = {"torch": torch, "F": F}
    exec(compile(source(program), f"<lmtrain step of {name}>", "exec"), namespace)  # noqa: S102  our own generated text
    forward, backward = namespace["forward_step"], namespace["backward_step"]
    forward.__qualname__ = f"{name}.forward_step"
    backward.__qualname__ = f"{name}.backward_step"
    return forward, backward


def engine_steps(step: Step, module: str) -> tuple[Callable, Callable]:
    """A cell module's forward_step and backward_step, generated from its STEP."""
    return steps(step.program(), module.rsplit(".", 1)[-1])
