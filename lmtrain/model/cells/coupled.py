"""The coupled input-forget gate LSTM (CIFG): the input gate is 1 - f, so there is no i block.

Gate order in the 3H-wide pre-activations is f, g, o (lmtrain.model.cells.lstm's without i), one bias:

    f = σ(W_f x + U_f h + b_f)      forget gate; what is forgotten is replaced
    g = tanh(W_g x + U_g h + b_g)   candidate
    o = σ(W_o x + U_o h + b_o)      output gate
    c' = f ⊙ c + (1 - f) ⊙ g
    h' = o ⊙ tanh(c')
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.cells.equations import Step
from lmtrain.model.kernels.cell_sequence import SequenceKernel
from lmtrain.model.kernels.emit_torch import engine_steps

FORGET_GATE = 0  # block of the forget gate in the pre-activations (model.forget_bias)


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h, c)."""
    h, c = state
    outputs = []
    for x_t in x:
        f, g, o = (x_t @ w_ih.t() + h @ w_hh.t() + b_ih).chunk(3, dim=1)
        f = torch.sigmoid(f)
        c = f * c + (1 - f) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def equations(x, u, s, p, f):
    """The step of the module's docstring, c' written as g + f (c - g)."""
    forget, g, o = f.sigmoid(x.f + u.f), f.tanh(x.g + u.g), f.sigmoid(x.o + u.o)
    c = g + forget * (s.c - g)
    return {"h": o * f.tanh(c), "c": c}


STEP = Step(gates=("f", "g", "o"), states=("h", "c"), equations=equations)
GATES, STATE, RECURRENT_BIAS, EXTRA = STEP.layout()
forward_step, backward_step = engine_steps(STEP, __name__)  # the engine's per-step functions, generated
sequence_kernel = SequenceKernel("coupled")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)
