"""The LSTM cell (Hochreiter & Schmidhuber 1997, with Gers et al. 2000's forget gate).

Gate order in the 4H-wide pre-activations is i, f, g, o, as in PyTorch's LSTM module, so weights can be
copied between the two (our one bias is the sum of torch's b_ih and b_hh):

    i = σ(W_i x + U_i h + b_i)      input gate
    f = σ(W_f x + U_f h + b_f)      forget gate
    g = tanh(W_g x + U_g h + b_g)   candidate
    o = σ(W_o x + U_o h + b_o)      output gate
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.cells.equations import Step
from lmtrain.model.kernels import lstm as sequence_kernel  # noqa: F401  (the engine's fast path on the CPU)
from lmtrain.model.kernels.emit_torch import engine_steps

FORGET_GATE = 1  # block of the forget gate in the pre-activations (model.forget_bias)


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h, c)."""
    h, c = state
    outputs = []
    for x_t in x:
        i, f, g, o = (x_t @ w_ih.t() + h @ w_hh.t() + b_ih).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def equations(x, u, s, p, f):
    """The step of the module's docstring; x, u, s: pre-activations and states by name, f: functions."""
    i, forget, g, o = f.sigmoid(x.i + u.i), f.sigmoid(x.f + u.f), f.tanh(x.g + u.g), f.sigmoid(x.o + u.o)
    c = forget * s.c + i * g
    return {"h": o * f.tanh(c), "c": c}


STEP = Step(gates=("i", "f", "g", "o"), states=("h", "c"), equations=equations)
GATES, STATE, RECURRENT_BIAS, EXTRA = STEP.layout()
forward_step, backward_step = engine_steps(STEP, __name__)  # the engine's per-step functions, generated
