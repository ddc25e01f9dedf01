"""The LSTM cell (Hochreiter & Schmidhuber 1997, with Gers et al. 2000's forget gate).

Gate order in the 4H-wide pre-activations is i, f, g, o, as in PyTorch's LSTM module, so weights can be
copied between the two (our one bias is the sum of torch's b_ih and b_hh):

    i = σ(W_i x + U_i h + b_i)      input gate
    f = σ(W_f x + U_f h + b_f)      forget gate
    g = tanh(W_g x + U_g h + b_g)   candidate
    o = σ(W_o x + U_o h + b_o)      output gate
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.kernels import lstm as sequence_kernel  # noqa: F401  (the engine's fast path)

GATES = 4
STATE = ("h", "c")
RECURRENT_BIAS = False
FORGET_GATE = 1  # block of the forget gate in the pre-activations (model.forget_bias)
EXTRA: dict[str, int] = {}  # per-unit parameters: name -> number of H-sized blocks


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h, c)."""
    h, c = state
    outputs = []
    for x_t in x:
        i, f, g, o = (x_t @ w_ih.t() + h @ w_hh.t() + b_ih).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def forward_step(xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """xg, hg: (B, 4H) input and recurrent pre-activations; state (h, c) each (B, H).

    Returns the new (h, c) and what backward_step needs: the activations (B, 4H) and tanh(c').
    """
    c = state[1]
    hidden = c.size(1)
    acts = xg + hg
    acts[:, : 2 * hidden].sigmoid_()
    acts[:, 2 * hidden : 3 * hidden].tanh_()
    acts[:, 3 * hidden :].sigmoid_()
    i, f, g, o = acts.chunk(4, dim=1)
    c_new = torch.addcmul(f * c, i, g)
    tanh_c = torch.tanh(c_new)
    return (o * tanh_c, c_new), (acts, tanh_c)


def backward_step(d_state: tuple[Tensor, ...], saved: tuple[Tensor, ...], state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """Gradients through one step.

    d_state: (dh', dc') each (B, H); saved: from forward_step; state: the step's input (h, c).
    Returns d xg, d hg (the same (B, 4H) tensor here), the gradient of (h, c) not through W_hh
    (None for h: h reaches the step only through W_hh), and the extra parameters' gradients.
    """
    dh, dc = d_state
    acts, tanh_c = saved
    c_prev = state[1]
    i, f, g, o = acts.chunk(4, dim=1)
    dgates = torch.empty_like(acts)
    di, df, dg, do = dgates.chunk(4, dim=1)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    torch.mul(dh * tanh_c, o * (1 - o), out=do)
    torch.mul(dc * g, i * (1 - i), out=di)
    torch.mul(dc * c_prev, f * (1 - f), out=df)
    torch.mul(dc * i, 1 - g * g, out=dg)
    return dgates, dgates, (None, dc * f), ()
