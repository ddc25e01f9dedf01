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

from lmtrain.model.kernels.cell_sequence import SequenceKernel

GATES = 3
STATE = ("h", "c")
RECURRENT_BIAS = False
FORGET_GATE = 0  # block of the forget gate in the pre-activations (model.forget_bias)
EXTRA: dict[str, int] = {}
sequence_kernel = SequenceKernel("coupled")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)


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


def forward_step(xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """xg, hg: (B, 3H) input and recurrent pre-activations; state (h, c) each (B, H).

    Returns the new (h, c) and what backward_step needs: the activations (B, 3H) and tanh(c').
    """
    c = state[1]
    hidden = c.size(1)
    acts = xg + hg
    acts[:, :hidden].sigmoid_()
    acts[:, hidden : 2 * hidden].tanh_()
    acts[:, 2 * hidden :].sigmoid_()
    f, g, o = acts.chunk(3, dim=1)
    c_new = torch.addcmul(g, f, c - g)  # f c + (1 - f) g
    tanh_c = torch.tanh(c_new)
    return (o * tanh_c, c_new), (acts, tanh_c)


def backward_step(d_state: tuple[Tensor, ...], saved: tuple[Tensor, ...], state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """Gradients through one step.

    d_state: (dh', dc') each (B, H); saved: from forward_step; state: the step's input (h, c).
    Returns d xg, d hg (the same (B, 3H) tensor here), the gradient of (h, c) not through W_hh
    (None for h), and no extra gradients.
    """
    dh, dc = d_state
    acts, tanh_c = saved
    c_prev = state[1]
    f, g, o = acts.chunk(3, dim=1)
    dgates = torch.empty_like(acts)
    df, dg, do = dgates.chunk(3, dim=1)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    torch.mul(dh * tanh_c, o * (1 - o), out=do)
    torch.mul(dc * (c_prev - g), f * (1 - f), out=df)
    torch.mul(dc * (1 - f), 1 - g * g, out=dg)
    return dgates, dgates, (None, dc * f), ()
