"""The 2-D Grid LSTM stack (Kalchbrenner, Danihelka & Graves 2015, "Grid Long Short-Term Memory"),
`model.stack = "grid"`: depth has an LSTM memory of its own beside time's.

The block at step t and depth d reads H = [h_{t-1}; x_t], time's hidden state and what the block
below hands up (x_t: the embedding at d = 0, the lower block's depth output above), and runs two
LSTM transforms of it, each with its own weights and its own memory:

    time:   i, f, g, o = split(W_ih x_t + W_hh h_{t-1} + b_ih)       c_t = σf ⊙ c_{t-1} + σi ⊙ tanh g
                                                                     h_t = σo ⊙ tanh c_t
    depth:  i', f', g', o' = split(W_dx x_t + W_dh h_{t-1} + b_d)    m_t = σf' ⊙ m_t^{below} + σi' ⊙ tanh g'
                                                                     y_t = σo' ⊙ tanh m_t

(h_t, c_t) go on in time, the layer's carried state; (y_t, m_t) go up in depth: y_t is the layer's
output, which the next layer takes as its x_t and the decoder reads from the top layer, and m_t
its memory, handed up beside it (lmtrain.model.layer's `passes_up`), as the depth memory below of
the next layer's depth transform. At d = 0 there is no memory below: m^{below} = 0. Gate order in
each 4H block is i, f, g, o (lmtrain.model.cells.lstm's).

Layer-major order computes this exactly: a layer's time transform needs only its own past and its
input sequence, and its depth transform needs x_t and h_{t-1}, both known for the whole window once
the time transform has run. So the fast path, `run`, is our LSTM's own (lmtrain.model.recurrence:
the compiled time loops with their hand-written backward) for the time transform, then the depth
transform over the whole window at once: one product for W_dx over T·B rows, one for W_dh, and the
pointwise gates; no loop over time in it.

`model.grid_tied`: every layer shares the first layer's weights (the paper's tied Grid LSTM), which
needs the embedding as wide as the layers; `tie` does it once the layers are built.
weight_drop (model.weight_drop): DropConnect on both matrices that read h_{t-1}, W_hh and W_dh,
one mask each per window, in training only. Zoneout (model.zoneout_hidden, model.zoneout_cell) acts on
time's (h, c), which run_layer mixes between steps as for an lstm layer; depth's memory is not zoned. `reference` is the equations above in plain autograd,
a step at a time; tests/test_grid.py holds `run` to it.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.model.cells import lstm
from lmtrain.model.kernels import mixed
from lmtrain.model.layer import RecurrentLayer
from lmtrain.model.recurrence import run_layer

GATES = 2 * lstm.GATES  # time's i, f, g, o and depth's: what the memory estimate counts per unit
STATE = lstm.STATE  # (h, c): time's; depth's memory is handed up, never carried
RECURRENT_BIAS = False
EXTRA: dict[str, tuple[str, ...]] = {}
FORGET_GATE = lstm.FORGET_GATE  # in both blocks (model.forget_bias)
DEPTH = ("w_dx", "w_dh", "b_d")  # the depth transform's parameters, after time's w_ih, w_hh, b_ih


def depth_step(gates: Tensor, below: Tensor | None) -> tuple[Tensor, Tensor]:
    """The depth transform's pointwise part: gates (..., 4H), below (..., H) or None -> (y, m)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    m = torch.sigmoid(i) * torch.tanh(g)
    if below is not None:
        m = m + torch.sigmoid(f) * below
    return torch.sigmoid(o) * torch.tanh(m), m


def reference(x: Tensor, below: Tensor | None, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
              w_dx: Tensor, w_dh: Tensor, b_d: Tensor, compute_dtype: torch.dtype | None = None):
    """The equations in plain autograd, a step at a time: x (T, B, I), below (T, B, H) or None ->
    y (T, B, H), m (T, B, H), the final (h, c). compute_dtype bfloat16 rounds each product's
    operands as the fast path does (lmtrain.model.kernels.mixed)."""

    product = partial(mixed.linear, compute_dtype=compute_dtype)  # a (·, I) @ w (O, I)^T, rounded as the fast path

    h, c = state
    ys, ms = [], []
    for t, x_t in enumerate(x):
        i, f, g, o = (product(x_t, w_ih) + product(h, w_hh) + b_ih).chunk(4, dim=1)
        y, m = depth_step(product(x_t, w_dx) + product(h, w_dh) + b_d, None if below is None else below[t])
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(y)
        ms.append(m)
    return torch.stack(ys), torch.stack(ms), (h, c)


def run(x: Tensor, below: Tensor | None, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
        w_dx: Tensor, w_dh: Tensor, b_d: Tensor, compute_dtype: torch.dtype | None = None, zoneout=None):
    """The fast path: what `reference` computes. Time's transform on the LSTM's own path (its compiled
    loops where they run), then depth's over the whole window. zoneout (a zoneout.Zone, or None)
    acts on time's (h, c), as on an lstm layer's; depth reads the zoned h_{t-1}."""
    hs, final = run_layer(lstm, x, state, w_ih, w_hh, b_ih, compute_dtype=compute_dtype, zoneout=zoneout)
    if x.dtype != torch.float32:
        compute_dtype = None
    h_prev = torch.cat([state[0].unsqueeze(0), hs[:-1]])  # h_{t-1} for every t, (T, B, H)
    rows = x.size(0) * x.size(1)
    gates = mixed.mm(mixed.operand(x.reshape(rows, -1), compute_dtype), mixed.operand(w_dx, compute_dtype).t(), b_d)
    gates = gates + mixed.mm(mixed.operand(h_prev.reshape(rows, -1), compute_dtype), mixed.operand(w_dh, compute_dtype).t())
    y, m = depth_step(gates.view(x.size(0), x.size(1), -1), below)
    return y, m, final


class Layer(RecurrentLayer):
    """One layer of the grid: time's w_ih (4H, I), w_hh (4H, H), b_ih (4H,) and depth's w_dx (4H, I),
    w_dh (4H, H), b_d (4H,). forward(x, state, weight_drop, compute_dtype, below) -> y (T, B, H), time's
    final (h, c), and m (T, B, H) for the layer above; below: the memory the layer underneath handed up
    (None for the first layer)."""

    passes_up = True

    @staticmethod
    def shapes(cell: ModuleType, input_size: int, hidden_size: int, config=None,
               below: ModuleType | None = None) -> dict[str, tuple[int, ...]]:
        width = lstm.GATES * hidden_size
        time = {"w_ih": (width, input_size), "w_hh": (width, hidden_size), "b_ih": (width,)}
        return time | {"w_dx": (width, input_size), "w_dh": (width, hidden_size), "b_d": (width,)}

    def initialise(self, config) -> None:
        """RecurrentLayer's (model.recurrent_init over every parameter), and model.forget_bias on both
        forget gates."""
        super().initialise(config)
        if config.forget_bias:
            with torch.no_grad():
                self.b_d[FORGET_GATE * self.hidden_size : (FORGET_GATE + 1) * self.hidden_size] += config.forget_bias

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weight_drop: float = 0.0,
                compute_dtype: torch.dtype | None = None, below: Tensor | None = None):
        w_hh, w_dh = self.w_hh, self.w_dh
        if weight_drop and self.training:
            w_hh, w_dh = F.dropout(w_hh, weight_drop, True), F.dropout(w_dh, weight_drop, True)
        y, m, final = run(x, below, state, self.w_ih, w_hh, self.b_ih, self.w_dx, w_dh, self.b_d, compute_dtype,
                          zoneout=self.zone(x))
        return y, final, m


def tie(layers: nn.ModuleList) -> None:
    """model.grid_tied: every layer's parameters become the first layer's (the state_dict names them
    under each layer, one storage; the optimizer and the counts see them once)."""
    for layer in layers[1:]:
        for name, _ in layers[0].named_parameters():
            setattr(layer, name, getattr(layers[0], name))
