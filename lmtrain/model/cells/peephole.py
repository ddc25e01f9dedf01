"""The peephole LSTM (Gers & Schmidhuber 2000): the gates also look at the cell.

Gate order in the 4H-wide pre-activations is i, f, g, o, as in lmtrain.model.cells.lstm, with one bias.
The peepholes are diagonal: one (3H,) parameter holding the per-unit weights p_i, p_f, p_o.

    i = σ(W_i x + U_i h + p_i ⊙ c + b_i)     input gate, sees the old cell
    f = σ(W_f x + U_f h + p_f ⊙ c + b_f)     forget gate, sees the old cell
    g = tanh(W_g x + U_g h + b_g)            candidate
    c' = f ⊙ c + i ⊙ g
    o = σ(W_o x + U_o h + p_o ⊙ c' + b_o)    output gate, sees the new cell
    h' = o ⊙ tanh(c')
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.cells.equations import Step
from lmtrain.model.kernels.cell_sequence import SequenceKernel
from lmtrain.model.kernels.emit_torch import engine_steps

FORGET_GATE = 1  # block of the forget gate in the pre-activations (model.forget_bias)


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h, c)."""
    h, c = state
    p_i, p_f, p_o = extra[0].chunk(3)
    outputs = []
    for x_t in x:
        a_i, a_f, a_g, a_o = (x_t @ w_ih.t() + h @ w_hh.t() + b_ih).chunk(4, dim=1)
        c = torch.sigmoid(a_f + p_f * c) * c + torch.sigmoid(a_i + p_i * c) * torch.tanh(a_g)
        h = torch.sigmoid(a_o + p_o * c) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def equations(x, u, s, p, f):
    """The step of the module's docstring; p: the peepholes' blocks p_i, p_f, p_o."""
    i = f.sigmoid(x.i + u.i + p.p_i * s.c)
    forget = f.sigmoid(x.f + u.f + p.p_f * s.c)
    c = forget * s.c + i * f.tanh(x.g + u.g)
    o = f.sigmoid(x.o + u.o + p.p_o * c)
    return {"h": o * f.tanh(c), "c": c}


STEP = Step(gates=("i", "f", "g", "o"), states=("h", "c"), equations=equations, extra={"peephole": ("p_i", "p_f", "p_o")})
GATES, STATE, RECURRENT_BIAS, EXTRA = STEP.layout()
forward_step, backward_step = engine_steps(STEP, __name__)  # the engine's per-step functions, generated
sequence_kernel = SequenceKernel("peephole")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)
