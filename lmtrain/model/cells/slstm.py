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

from lmtrain.model.kernels.cell_sequence import SequenceKernel

GATES = 4
STATE = ("h", "c", "n", "m")
RECURRENT_BIAS = False
FORGET_GATE = 1  # block of the forget gate in the pre-activations (model.forget_bias)
EXTRA: dict[str, int] = {}
sequence_kernel = SequenceKernel("slstm")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)


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


def forward_step(xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """xg, hg: (B, 4H) input and recurrent pre-activations; state (h, c, n, m) each (B, H).

    Returns the new (h, c, n, m) and what backward_step needs: the activations i, f, tanh(z̃),
    σ(õ) (B, 4H); σ(-f̃) (B, H), the derivative of log σ(f̃); ĩ - (m + log σ(f̃)) (B, H), whose
    sign says which side of the max won; and c', n' (already kept as state).
    """
    _, c, n, m = state
    acts = xg + hg
    a_i, a_f, a_z, a_o = acts.chunk(4, dim=1)
    sig_neg_f = torch.sigmoid(-a_f)
    log_f = F.logsigmoid(a_f).add_(m)  # m + log σ(f̃)
    m_new = torch.maximum(a_i, log_f)
    margin = a_i - log_f
    a_i.sub_(m_new).exp_()  # now i
    a_f.copy_(log_f).sub_(m_new).exp_()  # now f
    a_z.tanh_()
    a_o.sigmoid_()
    i, f, tanh_z, o = a_i, a_f, a_z, a_o
    c_new = torch.addcmul(f * c, i, tanh_z)
    n_new = torch.addcmul(i, f, n)
    h_new = o * c_new / n_new
    return (h_new, c_new, n_new, m_new), (acts, sig_neg_f, margin, c_new, n_new)


def backward_step(d_state: tuple[Tensor, ...], saved: tuple[Tensor, ...], state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """Gradients through one step.

    d_state: (dh', dc', dn', dm') each (B, H); saved: from forward_step; state: the step's input.
    Returns d xg, d hg (the same (B, 4H) tensor here), the gradient of (h, c, n, m) not through
    W_hh (None for h: it reaches the step only through W_hh), and no extra gradients.
    """
    dh, dc, dn, dm = d_state
    acts, sig_neg_f, margin, c_new, n_new = saved
    _, c, n, _ = state
    i, f, tanh_z, o = acts.chunk(4, dim=1)
    dgates = torch.empty_like(acts)
    da_i, da_f, da_z, da_o = dgates.chunk(4, dim=1)
    ratio = c_new / n_new
    torch.mul(dh * ratio, o * (1 - o), out=da_o)
    dh_o_n = dh * o / n_new
    dc = dc + dh_o_n  # total gradients of c' and n'
    dn = dn - dh_o_n * ratio
    torch.mul(dc * i, 1 - tanh_z * tanh_z, out=da_z)
    di_i = (dc * tanh_z + dn) * i  # through i = exp(ĩ - m')
    df_f = (dc * c + dn * n) * f  # through f = exp(m + log σ(f̃) - m')
    dm = dm - di_i - df_f  # total gradient of m'
    to_i = (margin.sign() + 1) * 0.5  # torch.maximum's split: 1, 1/2 at a tie, or 0
    torch.addcmul(di_i, dm, to_i, out=da_i)
    d_log_f = df_f + dm - dm * to_i  # of m + log σ(f̃), which is also the gradient of m
    torch.mul(d_log_f, sig_neg_f, out=da_f)
    return dgates, dgates, (None, dc * f, dn * f, d_log_f), ()
