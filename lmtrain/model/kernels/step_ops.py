"""One generation step's C++ ops (cpu/step_cpu.cpp) behind Python functions: what lmtrain.generation
calls, so that no caller names torch.ops.lmtrain itself.

A product's weight W (N, K) is held in one of WEIGHT_PRECISIONS (cpu/step_products.h):

    fp32   float32 panels, exact
    bf16   bfloat16 pair panels; x is rounded to bfloat16 too, sums in float32 (AVX512-BF16)
    int8   int8 quad panels with one scale per output row; x is quantised per row (AVX512-VNNI)

and multiplied by `linear`. `lstm_cell_step` is the LSTM's pointwise step, `cell_step` any other
cell's; `stack_step` and
`stack_draw` a stack's whole step, any cells (with the draw of its tokens before it, for stack_draw)
as one op; `sample_rows` the draw alone. Every function here needs the compiled ops on the CPU
(`ops_for(device)` is not None); lmtrain.generation.stepper chooses which to use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.kernels.cell_sequence import functor_index, generated_programs

WEIGHT_PRECISIONS = ("fp32", "bf16", "int8")
KIND = {"fp32": 0, "bf16": 1, "int8": 2}  # step_cpu.cpp's step_available(kind)


def ops_for(device: torch.device):
    """The compiled ops for tensors on `device`: torch.ops.lmtrain on the CPU when built, else None."""
    return cpu_ops() if torch.device(device).type == "cpu" else None


def offers(precision: str, device: torch.device) -> bool:
    """Whether weights in `precision` have compiled products on `device` (needs the CPU's features)."""
    ops = ops_for(device)
    return ops is not None and ops.step_available(KIND[precision])


def pack(weight: Tensor, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """weight (N, K) float32 contiguous -> (panels, scales, sums) for `linear`; scales and sums are
    empty except for int8. Only where `offers(precision, weight.device)`."""
    ops = ops_for(weight.device)
    if precision == "int8":
        return ops.step_pack_int8(weight)
    empty = weight.new_empty(0)
    return ops.pack_panels(weight.bfloat16() if precision == "bf16" else weight), empty, empty


def linear(x: Tensor, panels: Tensor, scales: Tensor, sums: Tensor, bias: Tensor) -> Tensor:
    """x (B, K) float32 -> x W^T + bias (B, N) float32, W as `pack` left it; bias (N,)."""
    return torch.ops.lmtrain.step_linear(x, panels, scales, sums, bias, bias.numel())


def lstm_cell_step(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The LSTM's pointwise step: pre-activations gates (B, 4H) (i, f, g, o) and c (B, H) -> h', c'."""
    return torch.ops.lmtrain.lstm_cell_step(gates, c)


def cell_step(name: str, xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A cell's pointwise step in one op, its functor generated from its equations (the cells whose
    CPU loop is generated: cell_sequence.generated_programs): xg, hg (B, GH) with every bias in
    them, state (B, H) each -> the new state."""
    return tuple(torch.ops.lmtrain.cell_step(functor_index(name), xg, hg, list(state), [e.contiguous() for e in extra]))


def has_cell_step(name: str) -> bool:
    return name in generated_programs()


def sample_rows(logits: Tensor, uniforms: Tensor, temperature: float) -> Tensor:
    """logits (B, V), uniforms (B,) float32 -> (B,) int64: per row, the first token whose cumulative
    probability under softmax(logits / temperature) exceeds uniforms[b]."""
    return torch.ops.lmtrain.sample_rows(logits, uniforms, temperature)


def stack_layout(names: list[str], states: list[int], extras: list[int], apart: list[bool]) -> list[int]:
    """The whole-step op's description of a stack: 4 numbers per layer (its cell: -1 for the LSTM,
    else its functor's index; its number of states and of per-unit parameters; whether its two
    products are apart)."""
    layout = []
    for name, n_states, n_extra, two in zip(names, states, extras, apart):
        layout += [-1 if name == "lstm" else functor_index(name), n_states, n_extra, int(two)]
    return layout


def stack_step(tokens: Tensor, table: Tensor, stack: tuple[list[Tensor], ...], layout: list[int], states: list[Tensor],
               extra: list[Tensor], out: list[Tensor], scratch: Tensor) -> None:
    """A stack's whole step on tokens (B,) into out = [logits (B, V), every layer's new states].

    table (V, G_0 H_0): layer 0's E W_ih^T + b_ih; stack: the products (layer 0's W_hh, each later
    layer's [W_ih, W_hh], or W_ih and W_hh apart for cells with a recurrent bias, then the decoder)
    as four lists (panels, scales, sums, biases); layout: stack_layout's; states: every layer's
    float32 states (B, H_l) in order; extra: every layer's per-unit parameters; scratch: uint8
    working memory, grown by the op. No output may be an input."""
    torch.ops.lmtrain.stack_step(tokens, table, *stack, layout, states, extra, out, scratch)


def stack_draw(logits: Tensor, uniforms: Tensor, temperature: float, table: Tensor, stack: tuple[list[Tensor], ...],
               layout: list[int], states: list[Tensor], extra: list[Tensor], out: list[Tensor], scratch: Tensor) -> Tensor:
    """The tokens (B,) drawn from logits (B, V) as sample_rows draws them, then stack_step on them."""
    return torch.ops.lmtrain.stack_draw(logits, uniforms, temperature, table, *stack, layout, states, extra, out, scratch)
