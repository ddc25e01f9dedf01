"""Attention over past states (Daniluk, Rocktäschel, Welbl & Riedel 2017, "Frustratingly Short
Attention Spans in Neural Language Modeling"), the key-value form, as model.attention_window = K.

The top layer's output h_t (width H, even) is split into a key and a value half, as in the paper:

    [k_t; v_t] = h_t                                     k_t, v_t (D,), D = H / 2
    M_t = tanh(W_y [k_{t-K} … k_{t-1}] + (W_h k_t) 1ᵀ)   (D, K)    W_y, W_h (D, D)
    α_t = softmax(wᵀ M_t)                                (K,)      w (D,)
    r_t = [v_{t-K} … v_{t-1}] α_tᵀ                       (D,)
    h*_t = tanh(W_r r_t + W_x v_t)                       (H,)      W_r, W_x (H, D)

and h*_t, not h_t, goes on to the output dropout and the decoder. Where the paper's h* is D wide
(its output layer reads k values), ours is H wide: the decoder's input is what it is without
attention, so model.tie_weights works unchanged. No biases (the paper writes none).

The memory is the last K keys and values, carried from window to window as part of the model's
state (lmtrain.model.language_model: one more entry after the layers' states), each tensor
(B, width) as the layers' are:

    keys    (B, K·D)   slot j (oldest first) in columns j·D … (j+1)·D − 1
    values  (B, K·D)   likewise
    filled  (B, K)     1 where slot j holds a past output, 0 where it is empty (the start)

so the state stays K vectors per stream however long the text (generation's memory is flat). An
empty slot gets no weight; a position with no filled slot at all (the very first) has r_t = 0.
The memory holds keys, not W_y keys: a slot's projection uses the weights of the step that reads it.

Position t of a window attends over the K outputs before it: those of the memory and the
window's own earlier ones. `attend`, the fast path, does the whole window at once (no loop over
time, so autograd's backward is already one pass): the memory and the window's keys joined in
time, (K + T, B, D), projected by W_y in one product, and each position's K slots taken as a band
of that sequence (unfold, a view):

    joined:   m_1 … m_K  k_1 … k_T          position t reads slots t … t + K − 1 (before its own, K + t)
    band:     (T, B, D, K)  →  scores (T, B, K)  →  masked softmax  →  r (T, B, D)

`reference` is the same equations in plain autograd, a stream and a step at a time, the memory a
Python list; tests/test_attention.py holds the two together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Memory = tuple[Tensor, Tensor, Tensor]  # keys (B, K·D), values (B, K·D), filled (B, K)


def shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The attention's state_dict shapes by name, in order, over a top layer of `hidden_size` units."""
    d = hidden_size // 2
    return {"w_y": (d, d), "w_h": (d, d), "w": (d,), "w_r": (hidden_size, d), "w_x": (hidden_size, d)}


def state_widths(hidden_size: int, window: int) -> dict[str, int]:
    """The memory's tensors by name, in order, each (B, width)."""
    d = hidden_size // 2
    return {"keys": window * d, "values": window * d, "filled": window}


def position_units(hidden_size: int, window: int) -> int:
    """Values the fast path keeps per position for the backward, roughly: the tanh of its band
    (K·D), its K scores and weights, r (D) and h* (H); for the memory estimates."""
    d = hidden_size // 2
    return window * (d + 2) + d + hidden_size


class Attention(nn.Module):
    """The attention's parameters (module docstring); the window's work is `attend`."""

    def __init__(self, hidden_size: int, window: int):
        super().__init__()
        self.hidden_size, self.window = hidden_size, window
        for name, shape in shapes(hidden_size).items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))

    def init_state(self, batch_size: int, like: Tensor) -> Memory:
        """An empty memory: every slot zeros and unfilled."""
        return tuple(like.new_zeros(batch_size, width) for width in state_widths(self.hidden_size, self.window).values())

    def forward(self, y: Tensor, memory: Memory) -> tuple[Tensor, Memory]:
        """y (T, B, H), the top layer's outputs -> h* (T, B, H) and the new memory."""
        return attend(y, memory, self.w_y, self.w_h, self.w, self.w_r, self.w_x)


def attend(y: Tensor, memory: Memory, w_y: Tensor, w_h: Tensor, w: Tensor, w_r: Tensor,
           w_x: Tensor) -> tuple[Tensor, Memory]:
    """The fast path: y (T, B, H) and the memory (K slots) -> h* (T, B, H), the new memory."""
    steps, batch, hidden = y.shape
    d = hidden // 2
    window = memory[2].size(1)
    k, v = y.split(d, dim=2)  # (T, B, D) each
    keys = torch.cat([memory[0].reshape(batch, window, d).transpose(0, 1), k])  # (K + T, B, D), oldest first
    values = torch.cat([memory[1].reshape(batch, window, d).transpose(0, 1), v])
    filled = torch.cat([memory[2].t(), memory[2].new_ones(steps, batch)])  # (K + T, B)
    # position t's slots are t … t + K − 1 of the joined sequence: unfold gives (T + 1, B, ·, K)
    band = F.linear(keys, w_y).unfold(0, window, 1)[:steps]  # (T, B, D, K)
    held = filled.unfold(0, window, 1)[:steps] > 0  # (T, B, K)
    scores = torch.einsum("tbdk,d->tbk", torch.tanh(band + F.linear(k, w_h).unsqueeze(-1)), w)
    # empty slots get no weight; a position with none filled keeps its scores, then weights 0 (r = 0)
    scores = scores.masked_fill(~held & held.any(-1, keepdim=True), float("-inf"))
    alpha = torch.softmax(scores, -1) * held
    r = (values.unfold(0, window, 1)[:steps] @ alpha.unsqueeze(-1)).squeeze(-1)  # (T, B, D)
    out = torch.tanh(F.linear(r, w_r) + F.linear(v, w_x))
    new = (keys[steps:].transpose(0, 1).reshape(batch, window * d),
           values[steps:].transpose(0, 1).reshape(batch, window * d), filled[steps:].t().contiguous())
    return out, new


def reference(y: Tensor, memory: Memory, w_y: Tensor, w_h: Tensor, w: Tensor, w_r: Tensor,
              w_x: Tensor) -> tuple[Tensor, Memory]:
    """The equations in plain autograd, a stream and a step at a time: as `attend`."""
    steps, batch, hidden = y.shape
    d = hidden // 2
    window = memory[2].size(1)
    keys = [list(memory[0][b].view(window, d).unbind(0)) for b in range(batch)]
    values = [list(memory[1][b].view(window, d).unbind(0)) for b in range(batch)]
    filled = [[bool(f > 0) for f in memory[2][b].tolist()] for b in range(batch)]
    outputs = []
    for t in range(steps):
        row = []
        for b in range(batch):
            k_t, v_t = y[t, b, :d], y[t, b, d:]
            slots = [j for j in range(window) if filled[b][j]]
            if slots:
                y_k = torch.stack([keys[b][j] for j in slots], 1)  # (D, n)
                y_v = torch.stack([values[b][j] for j in slots], 1)
                m = torch.tanh(w_y @ y_k + (w_h @ k_t).unsqueeze(1))
                r = y_v @ torch.softmax(w @ m, 0)
            else:
                r = torch.zeros_like(v_t)
            row.append(torch.tanh(w_r @ r + w_x @ v_t))
            keys[b], values[b], filled[b] = keys[b][1:] + [k_t], values[b][1:] + [v_t], filled[b][1:] + [True]
        outputs.append(torch.stack(row))
    new = (torch.stack([torch.cat(keys[b]) for b in range(batch)]), torch.stack([torch.cat(values[b]) for b in range(batch)]),
           torch.tensor(filled, dtype=y.dtype, device=y.device).view(batch, window))
    return torch.stack(outputs), new
