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

from lmtrain.model.kernels.cell_sequence import SequenceKernel

GATES = 4
STATE = ("h", "c")
RECURRENT_BIAS = False
FORGET_GATE = 1  # block of the forget gate in the pre-activations (model.forget_bias)
EXTRA: dict[str, int] = {"peephole": 3}  # p_i, p_f, p_o, each (H,)
sequence_kernel = SequenceKernel("peephole")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)


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


def forward_step(xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """xg, hg: (B, 4H) input and recurrent pre-activations; state (h, c) each (B, H); extra (p,) (3H,).

    Returns the new (h, c) and what backward_step needs: the activations (B, 4H), c' and tanh(c').
    """
    c = state[1]
    hidden = c.size(1)
    p_i, p_f, p_o = extra[0].chunk(3)
    acts = xg + hg
    acts[:, :hidden].addcmul_(c, p_i)
    acts[:, hidden : 2 * hidden].addcmul_(c, p_f)
    acts[:, : 2 * hidden].sigmoid_()
    acts[:, 2 * hidden : 3 * hidden].tanh_()
    i, f, g, o = acts.chunk(4, dim=1)
    c_new = torch.addcmul(f * c, i, g)
    o.addcmul_(c_new, p_o).sigmoid_()
    tanh_c = torch.tanh(c_new)
    return (o * tanh_c, c_new), (acts, c_new, tanh_c)


def backward_step(d_state: tuple[Tensor, ...], saved: tuple[Tensor, ...], state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """Gradients through one step.

    d_state: (dh', dc') each (B, H); saved: from forward_step; state: the step's input (h, c).
    Returns d xg, d hg (the same (B, 4H) tensor here), the gradient of (h, c) not through W_hh
    (None for h), and the peephole gradient (3H,) summed over the batch.
    """
    dh, dc = d_state
    acts, c_new, tanh_c = saved
    c_prev = state[1]
    p_i, p_f, p_o = extra[0].chunk(3)
    i, f, g, o = acts.chunk(4, dim=1)
    dgates = torch.empty_like(acts)
    di, df, dg, do = dgates.chunk(4, dim=1)
    torch.mul(dh * tanh_c, o * (1 - o), out=do)
    # c' reaches the loss through h' = o tanh(c'), through o's peephole, and through the next step
    dc = (dc + dh * o * (1 - tanh_c * tanh_c)).addcmul_(do, p_o)
    torch.mul(dc * g, i * (1 - i), out=di)
    torch.mul(dc * c_prev, f * (1 - f), out=df)
    torch.mul(dc * i, 1 - g * g, out=dg)
    dc_prev = (dc * f).addcmul_(di, p_i).addcmul_(df, p_f)
    d_peephole = torch.cat([(di * c_prev).sum(0), (df * c_prev).sum(0), (do * c_new).sum(0)])
    return dgates, dgates, (None, dc_prev), (d_peephole,)
