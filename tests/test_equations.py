"""The step language (lmtrain/model/cells/equations.py) and its torch emitter: the derived
backward of any equations equals autograd's gradient of the same equations, what the forward
saves is decided as documented, and equal expressions are one node."""

from types import SimpleNamespace

import pytest
import torch

from lmtrain.model.cells import CELLS
from lmtrain.model.cells.equations import Step
from lmtrain.model.kernels import dispatch
from lmtrain.model.kernels.emit_torch import steps


def toy(x, u, s, p, f):
    """A cell no module has: every function and operation of the language, two states, a parameter."""
    a = f.sigmoid(x.a + u.a + p.w * s.c)
    b = f.tanh(x.b - 0.5 * u.b)
    m = f.maximum(x.a * u.b, s.c)
    c = a * s.c + (1 - a) * b / (1.5 + a) + f.exp(-m * m) + f.log_sigmoid(u.a - s.h)
    return {"h": -c * b, "c": c}


TOY = Step(gates=("a", "b"), states=("h", "c"), equations=toy, extra={"weights": ("w",)})


def autograd_step(step, xg, hg, state, extra):
    """The equations run on tensors with torch's functions: what autograd differentiates."""
    hidden = state[0].size(1)

    def named(tensors: dict) -> SimpleNamespace:
        return SimpleNamespace(**tensors)

    gate = lambda t: named({n: t[:, k * hidden:(k + 1) * hidden] for k, n in enumerate(step.gates)})
    names = [n for blocks in step.extra.values() for n in blocks]
    flat = torch.cat(extra) if extra else None
    p = named({n: flat[k * hidden:(k + 1) * hidden] for k, n in enumerate(names)})
    f = SimpleNamespace(sigmoid=torch.sigmoid, tanh=torch.tanh, exp=torch.exp,
                        log_sigmoid=torch.nn.functional.logsigmoid, maximum=torch.maximum)
    out = step.equations(gate(xg), gate(hg), named(dict(zip(step.states, state))), p, f)
    return tuple(out[n] for n in step.states)


@pytest.mark.parametrize("name", ["toy", *(name for name, cell in CELLS.items() if dispatch.on_engine(cell))])
def test_the_derived_backward_is_autograds(name):
    step = TOY if name == "toy" else CELLS[name].STEP
    forward, backward = steps(step.program(), name)
    g = torch.Generator().manual_seed(3)
    batch, hidden, gates = 4, 5, len(step.gates)
    leaf = lambda *shape: (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    xg, hg = leaf(batch, gates * hidden), leaf(batch, gates * hidden)
    state = [leaf(batch, hidden) for _ in step.states]
    if len(state) == 4:  # the sLSTM's normaliser is positive
        state[2] = (state[2].detach().abs() + 0.5).requires_grad_()
    extra = tuple(leaf(len(blocks) * hidden) for blocks in step.extra.values())
    d = [torch.randn(batch, hidden, generator=g, dtype=torch.float64) for _ in step.states]

    expected = autograd_step(step, xg, hg, tuple(state), extra)
    new, saved = forward(xg.detach(), hg.detach(), tuple(s.detach() for s in state), tuple(e.detach() for e in extra))
    for ours, theirs in zip(new, expected):
        assert torch.allclose(ours, theirs.detach(), atol=1e-13)
    grads = torch.autograd.grad(expected, [xg, hg, *state, *extra], d, allow_unused=True)
    d_xg, d_hg, d_direct, d_extra = backward(tuple(d), saved, tuple(s.detach() for s in state), tuple(e.detach() for e in extra))
    assert torch.allclose(d_xg, grads[0], atol=1e-12) and torch.allclose(d_hg, grads[1], atol=1e-12)
    for ours, theirs in zip(d_direct, grads[2:2 + len(state)]):
        theirs = torch.zeros_like(state[0]) if theirs is None else theirs
        assert torch.allclose(torch.zeros_like(theirs) if ours is None else ours, theirs, atol=1e-12)
    for ours, theirs in zip(d_extra, grads[2 + len(state):]):
        assert torch.allclose(ours, theirs, atol=1e-12)


def test_what_the_forward_saves():
    """Function values and pre-activations the backward needs are saved; states are read again."""
    saved = lambda name: [n.op for n in CELLS[name].STEP.program().saved]
    assert saved("lstm") == ["sigmoid", "sigmoid", "tanh", "sigmoid", "tanh"]  # i, f, g, o, tanh c'
    assert saved("gru") == ["u", "sigmoid", "sigmoid", "tanh"]  # U_n h + b_hn, r, z, n
    assert saved("rnn") == []  # tanh's derivative comes from h', the new state
    assert CELLS["gru"].STEP.program().shared_gradient is False
    assert CELLS["lstm"].STEP.program().shared_gradient is True


def test_an_expression_written_twice_is_one_node():
    from lmtrain.model.cells.equations import Graph

    graph = Graph()
    a, b = graph.leaf("x", 0), graph.leaf("u", 0)
    assert (a + b) is (a + b) and (a * 1.0) is a and (a + 0.0) is a and (2.0 * a) is (a * 2.0)
