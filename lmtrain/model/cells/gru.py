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

from lmtrain.model.kernels.cell_sequence import SequenceKernel

GATES = 3
STATE = ("h",)
RECURRENT_BIAS = True
EXTRA: dict[str, int] = {}
sequence_kernel = SequenceKernel("gru")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)


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


def forward_step(xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """xg = W x + b_ih, hg = U h + b_hh: (B, 3H); state (h,) (B, H).

    Returns the new (h,) and what backward_step needs: the activations r, z, n (B, 3H) and
    U_n h + b_hn (B, H).
    """
    h = state[0]
    hidden = h.size(1)
    gates = torch.empty_like(xg)
    r, z, n = gates.chunk(3, dim=1)
    torch.add(xg[:, : 2 * hidden], hg[:, : 2 * hidden], out=gates[:, : 2 * hidden]).sigmoid_()
    hg_n = hg[:, 2 * hidden :].clone()  # a copy, so the rest of hg is not kept alive for backward
    torch.addcmul(xg[:, 2 * hidden :], r, hg_n, out=n).tanh_()
    h_new = torch.addcmul(n, z, h - n)  # (1 - z) n + z h
    return (h_new,), (gates, hg_n)


def backward_step(d_state: tuple[Tensor, ...], saved: tuple[Tensor, ...], state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """Gradients through one step.

    d_state: (dh',) (B, H); saved: from forward_step; state: the step's input (h,).
    Returns d xg and d hg, two (B, 3H) tensors that agree on r and z and differ on n
    (d(U_n h + b_hn) = r ⊙ d(W_n x + b_in)), the direct gradient of h (z ⊙ dh'), and no extras.
    """
    (dh,) = d_state
    gates, hg_n = saved
    h = state[0]
    hidden = h.size(1)
    r, z, n = gates.chunk(3, dim=1)
    d_xg = torch.empty_like(gates)
    dr, dz, dn = d_xg.chunk(3, dim=1)
    torch.mul(dh * (1 - z), 1 - n * n, out=dn)
    torch.mul(dh * (h - n), z * (1 - z), out=dz)
    torch.mul(dn * hg_n, r * (1 - r), out=dr)
    d_hg = torch.cat([d_xg[:, : 2 * hidden], dn * r], dim=1)
    return d_xg, d_hg, (dh * z,), ()
