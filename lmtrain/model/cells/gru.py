"""The gated recurrent unit (Cho et al. 2014) exactly as PyTorch's GRU module defines it.

Gate order in the 3H-wide pre-activations is r, z, n, as in PyTorch's GRU module, and the recurrent bias
is kept apart (RECURRENT_BIAS), so w_ih, w_hh, b_ih and b_hh are torch's weight_ih, weight_hh,
bias_ih and bias_hh one for one. The reset gate scales the recurrent part of n, bias included:

    r = σ(W_r x + b_ir + U_r h + b_hr)              reset gate
    z = σ(W_z x + b_iz + U_z h + b_hz)              update gate
    n = tanh(W_n x + b_in + r ⊙ (U_n h + b_hn))     candidate
    h' = (1 - z) ⊙ n + z ⊙ h

So unlike the LSTM, the input and recurrent pre-activations get different gradients on the n
block, and h reaches h' directly as well as through U.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.cells.equations import Step
from lmtrain.model.kernels.cell_sequence import SequenceKernel
from lmtrain.model.kernels.emit_torch import engine_steps



def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h,)."""
    (h,) = state
    outputs = []
    for x_t in x:
        x_r, x_z, x_n = (x_t @ w_ih.t() + b_ih).chunk(3, dim=1)
        h_r, h_z, h_n = (h @ w_hh.t() + b_hh).chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs), (h,)


def equations(x, u, s, p, f):
    """The step of the module's docstring (u includes b_hh); h' written as n + z (h - n)."""
    r = f.sigmoid(x.r + u.r)
    z = f.sigmoid(x.z + u.z)
    n = f.tanh(x.n + r * u.n)
    return {"h": n + z * (s.h - n)}


STEP = Step(gates=("r", "z", "n"), states=("h",), equations=equations, recurrent_bias=True)
GATES, STATE, RECURRENT_BIAS, EXTRA = STEP.layout()
forward_step, backward_step = engine_steps(STEP, __name__)  # the engine's per-step functions, generated
sequence_kernel = SequenceKernel("gru")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)
