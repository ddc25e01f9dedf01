"""The LSTM cell (Hochreiter & Schmidhuber 1997, with Gers et al. 2000's forget gate).

Gate order in the 4H-wide pre-activations is i, f, g, o, as in torch.nn.LSTM, so weights can be
copied between the two:

    i = σ(W_i x + U_i h + b_i)      input gate
    f = σ(W_f x + U_f h + b_f)      forget gate
    g = tanh(W_g x + U_g h + b_g)   candidate
    o = σ(W_o x + U_o h + b_o)      output gate
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')

`reference` is the same equations in plain autograd, used by the tests to check the engine.
`pointwise_forward` / `pointwise_backward` are the per-step gate math the engine calls.
"""

from __future__ import annotations

import torch
from torch import Tensor

GATES = 4


def reference(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, bias: Tensor):
    """Run the cell over a sequence with plain autograd.

    x: (T, B, I); state: h, c each (B, H); w_ih: (4H, I); w_hh: (4H, H); bias: (4H,).
    Returns y (T, B, H) and the final (h, c).
    """
    h, c = state
    outputs = []
    for x_t in x:
        i, f, g, o = (x_t @ w_ih.t() + h @ w_hh.t() + bias).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def pointwise_forward(gates: Tensor, c_prev: Tensor, c_out: Tensor, tanh_c_out: Tensor, h_out: Tensor) -> None:
    """One step's gate math, in place.

    gates: (B, 4H) pre-activations on entry, activations (i, f, g, o) on return.
    c_prev: (B, H). Writes c_out, tanh_c_out, h_out, each (B, H).
    """
    hidden = c_prev.size(1)
    gates[:, : 2 * hidden].sigmoid_()
    gates[:, 2 * hidden : 3 * hidden].tanh_()
    gates[:, 3 * hidden :].sigmoid_()
    i, f, g, o = gates.chunk(4, dim=1)
    torch.mul(f, c_prev, out=c_out)
    c_out.addcmul_(i, g)
    torch.tanh(c_out, out=tanh_c_out)
    torch.mul(o, tanh_c_out, out=h_out)


def pointwise_backward(acts: Tensor, c_prev: Tensor, tanh_c: Tensor, dh: Tensor, dc: Tensor, dgates: Tensor) -> Tensor:
    """Gradients of one step's gate math.

    acts: (B, 4H) activations i, f, g, o saved by the forward; c_prev, tanh_c: (B, H);
    dh, dc: (B, H) gradients flowing into h' and c'. Writes the pre-activation gradients into
    dgates (B, 4H) and returns the gradient for c (B, H).
    """
    i, f, g, o = acts.chunk(4, dim=1)
    di, df, dg, do = dgates.chunk(4, dim=1)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    torch.mul(dh * tanh_c, o * (1 - o), out=do)
    torch.mul(dc * g, i * (1 - i), out=di)
    torch.mul(dc * c_prev, f * (1 - f), out=df)
    torch.mul(dc * i, 1 - g * g, out=dg)
    return dc * f
