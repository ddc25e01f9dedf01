"""The plain (Elman) recurrent cell with tanh: one H-wide block, one bias.

    h' = tanh(W x + U h + b)

PyTorch's RNN module (nonlinearity "tanh") computes the same with two biases; ours is their sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.kernels.cell_sequence import SequenceKernel

GATES = 1
STATE = ("h",)
RECURRENT_BIAS = False
EXTRA: dict[str, int] = {}
sequence_kernel = SequenceKernel("rnn")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equation in plain autograd: x (T, B, I) -> y (T, B, H), final (h,)."""
    (h,) = state
    outputs = []
    for x_t in x:
        h = torch.tanh(x_t @ w_ih.t() + h @ w_hh.t() + b_ih)
        outputs.append(h)
    return torch.stack(outputs), (h,)


def forward_step(xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """xg, hg: (B, H) input and recurrent pre-activations; state (h,) (B, H).

    Returns the new (h,) and what backward_step needs: h' itself.
    """
    h_new = (xg + hg).tanh_()
    return (h_new,), (h_new,)


def backward_step(d_state: tuple[Tensor, ...], saved: tuple[Tensor, ...], state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """Gradients through one step.

    d_state: (dh',) (B, H); saved: (h',). Returns d xg, d hg (the same (B, H) tensor), (None,)
    since h reaches the step only through W_hh, and no extra gradients.
    """
    (dh,) = d_state
    (h_new,) = saved
    da = dh * (1 - h_new * h_new)
    return da, da, (None,), ()
