"""The sLSTM of xLSTM (Beck et al. 2024): exponential gating with a normaliser and a stabiliser.

Gate order in the 4H-wide pre-activations is i, f, z, o (lmtrain.model.cells.lstm's, with the
candidate called z as in the paper), one bias, a full recurrent matrix (no block-diagonal heads).
With ĩ, f̃, z̃, õ the pre-activations W x + U h + b:

    m' = max(ĩ, m + log σ(f̃))          stabiliser
    i = exp(ĩ - m')                     input gate, exponential, stabilised
    f = exp(m + log σ(f̃) - m')          forget gate (sigmoid), stabilised
    c' = f ⊙ c + i ⊙ tanh(z̃)            cell
    n' = f ⊙ n + i                      normaliser
    h' = σ(õ) ⊙ c' / n'

Max(·) makes one of i, f exactly 1, so neither exponential overflows. The stabiliser is exact:
the state (c, n, m) stands for (c e^m, n e^m), and h = σ(õ) c / n does not depend on m.
The gradient through max() is autograd's for torch.maximum: all to the larger argument, half
to each at an exact tie.

Initial state: all zeros, like every cell (the model's init_state). With c = n = 0 the choice of
m_0 cannot change h (see above), so m_0 = 0 loses nothing and keeps the state finite. And the
first step cannot divide by zero: m_1 = max(ĩ, log σ(f̃)) ≤ max(ĩ, 0), so n_1 = i ≥ min(1, e^ĩ) > 0;
afterwards n never falls below it (a step either has i = 1 or f = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.model.cells.equations import Step
from lmtrain.model.kernels.cell_sequence import SequenceKernel
from lmtrain.model.kernels.emit_torch import engine_steps

FORGET_GATE = 1  # block of the forget gate in the pre-activations (model.forget_bias)
# model.zoneout_cell keeps c, n and m together, one mask: (c, n, m) stands for (c e^m, n e^m), so a
# unit keeps all three, and evaluation's expectation is of c e^m and n e^m (lmtrain.model.zoneout)
ZONEOUT_CELL = ("c", "n", "m")
ZONEOUT_LOG_SCALE = "m"


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h, c, n, m)."""
    h, c, n, m = state
    outputs = []
    for x_t in x:
        a_i, a_f, a_z, a_o = (x_t @ w_ih.t() + h @ w_hh.t() + b_ih).chunk(4, dim=1)
        log_f = m + F.logsigmoid(a_f)
        m = torch.maximum(a_i, log_f)
        i = torch.exp(a_i - m)
        f = torch.exp(log_f - m)
        c = f * c + i * torch.tanh(a_z)
        n = f * n + i
        h = torch.sigmoid(a_o) * c / n
        outputs.append(h)
    return torch.stack(outputs), (h, c, n, m)


def equations(x, u, s, p, f):
    """The step of the module's docstring, with ĩ = x.i + u.i and so on."""
    a_i = x.i + u.i
    log_f = s.m + f.log_sigmoid(x.f + u.f)
    m = f.maximum(a_i, log_f)
    i, forget = f.exp(a_i - m), f.exp(log_f - m)
    c = forget * s.c + i * f.tanh(x.z + u.z)
    n = forget * s.n + i
    return {"h": f.sigmoid(x.o + u.o) * c / n, "c": c, "n": n, "m": m}


STEP = Step(gates=("i", "f", "z", "o"), states=("h", "c", "n", "m"), equations=equations)
GATES, STATE, RECURRENT_BIAS, EXTRA = STEP.layout()
forward_step, backward_step = engine_steps(STEP, __name__)  # the engine's per-step functions, generated
sequence_kernel = SequenceKernel("slstm")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)
