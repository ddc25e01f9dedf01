"""The depth-gated LSTM (Yao, Cohn, Vylomova, Duh & Dyer 2015, "Depth-Gated LSTM").

A stack of LSTMs whose cells are also joined across layers: a depth gate d lets the cell of the
layer below, c_t^{L-1}, flow straight into the cell of layer L at the same step. Gate order in
the 4H-wide pre-activations is i, f, g, o (lmtrain.model.cells.lstm's), one bias. Above a dglstm
layer, with x_t the layer's input (the lower layer's output h_t^{L-1}, after dropout):

    i, f, o = σ(W x_t + U h_{t-1} + b),  g = tanh(W_g x_t + U_g h_{t-1} + b_g)     the LSTM's
    d   = σ(b_d + w_ld ⊙ c_t^{L-1} + W_xd x_t + w_cd ⊙ c_{t-1})                    depth gate
    c_t = f ⊙ c_{t-1} + i ⊙ g + d ⊙ c_t^{L-1}
    h_t = o ⊙ tanh(c_t)

w_ld and w_cd are per-unit weights (H,), W_xd a matrix (H, I), b_d (H,): parameters w_xd, b_d,
w_ld, w_cd of such a layer, beside the LSTM's w_ih (4H, I), w_hh (4H, H), b_ih (4H,). The first
layer, and a dglstm layer on top of another cell, has no cell below to read: it is the LSTM,
with the LSTM's parameters only (`tests/test_dglstm.py` holds it to lmtrain.model.cells.lstm).

The depth gate adds the lower cell unit by unit, so a dglstm layer on a dglstm layer must be as
wide as it is; building one that is not is an error naming the keys (with model.tie_weights the
last layer has model.embedding_size units; make that model.hidden_size, or the last layer
another cell: model.cell = "dglstm,lstm"). The cells pass up undropped (dropout between layers
applies to h only, as dglstm.cc drops its layer inputs and not its cells).

How this differs from the first author's implementation, clab/dynet's dynet/dglstm.cc
(DGLSTMBuilder), which we follow in the depth gate itself (its X2K, C2K, Q2K, BK are our W_xd,
w_ld, w_cd, b_d) but not in the rest:
  - a coupled input-forget gate there: f = 1 − i (USE_STANDARD_LSTM_DEFINE is off), so no f
    parameters; ours has its own forget gate, as the paper writes it (and model.forget_bias works);
  - full-matrix peepholes there: the input gate sees C2I c_{t-1} and the output gate C2O c_t,
    (H, H) each; ours has none, like our lstm;
  - layer 0 is depth-gated there too, its "lower cell" the input projected by X2K0 (H, I); ours
    is the LSTM;
  - its inputs are scaled by a learned exp(stab) (a "self stabiliser", one scalar per layer);
    ours are not.

Our layer (`Layer`, lmtrain.model.layer) hands its cells c_1 .. c_T (T, B, H) up the stack
(`passes_up`), which the depth gate of a dglstm layer above reads; the whole window runs in
lmtrain.model.kernels.dglstm (one Function, with a hand-written backward). `reference` is the
same in plain autograd.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from lmtrain.errors import LmtrainError
from lmtrain.model import zoneout
from lmtrain.model.cells import lstm
from lmtrain.model.kernels import dglstm as kernel
from lmtrain.model.kernels import mixed
from lmtrain.model.layer import RecurrentLayer

GATES, STATE, RECURRENT_BIAS, EXTRA = lstm.GATES, lstm.STATE, lstm.RECURRENT_BIAS, lstm.EXTRA  # the LSTM part's layout
FORGET_GATE = lstm.FORGET_GATE  # block of the forget gate in the pre-activations (model.forget_bias)
EXTENDS = "lstm"  # the cell this one adds to (its first layer, and any without a dglstm below): `lmtrain bench` times it beside this one
DEPTH = ("w_xd", "b_d", "w_ld", "w_cd")  # the depth gate's parameters, in the layer's state_dict order


def reference(x: Tensor, lower: Tensor | None, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
              depth: kernel.Depth | None = None, compute_dtype: torch.dtype | None = None):
    """The equations in plain autograd: x (T, B, I), lower (T, B, H) or None -> y (T, B, H), the
    cells (T, B, H), final (h, c). depth: (w_xd, b_d, w_ld, w_cd), with lower; compute_dtype
    bfloat16 rounds each product's operands as the fast path does (lmtrain.model.kernels.mixed)."""

    product = partial(mixed.linear, compute_dtype=compute_dtype)  # a (·, I) @ w (O, I)^T, rounded as the fast path

    h, c = state
    outputs, cells = [], []
    for t, x_t in enumerate(x):
        i, f, g, o = (product(x_t, w_ih) + product(h, w_hh) + b_ih).chunk(4, dim=1)
        new_c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if depth is not None:
            w_xd, b_d, w_ld, w_cd = depth
            d = torch.sigmoid(b_d + w_ld * lower[t] + product(x_t, w_xd) + w_cd * c)
            new_c = new_c + d * lower[t]
        c = new_c
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
        cells.append(c)
    return torch.stack(outputs), torch.stack(cells), (h, c)


class Layer(RecurrentLayer):
    """A dglstm layer: the LSTM's w_ih, w_hh, b_ih, and above a dglstm layer (below is this cell) the
    depth gate's w_xd (H, I), b_d, w_ld, w_cd (H,). forward(x, state, weight_drop, compute_dtype,
    below) -> y, (h, c), its cells (T, B, H) for the layer above; below: the cells of the dglstm
    layer underneath (needed exactly when the layer is depth-gated)."""

    passes_up = True

    def __init__(self, cell, input_size: int, hidden_size: int, config=None, below=None):
        super().__init__(cell, input_size, hidden_size, config, below)
        self.depth_gated = below is cell

    @staticmethod
    def shapes(cell, input_size: int, hidden_size: int, config=None, below=None) -> dict[str, tuple[int, ...]]:
        shapes = RecurrentLayer.shapes(cell, input_size, hidden_size, config)
        if below is not cell:
            return shapes
        if input_size != hidden_size:  # the layer's input is the lower layer's output: input_size is its width
            raise LmtrainError(
                f"model.cell: a dglstm layer of {hidden_size} units on a dglstm layer of {input_size}: the depth gate "
                f"adds the lower cell unit by unit and needs equal widths (model.tie_weights gives the last layer "
                f"model.embedding_size units: make it model.hidden_size, or the last layer another cell, "
                f"e.g. model.cell = \"dglstm,lstm\")")
        return shapes | {"w_xd": (hidden_size, input_size), "b_d": (hidden_size,), "w_ld": (hidden_size,), "w_cd": (hidden_size,)}

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weight_drop: float = 0.0,
                compute_dtype: torch.dtype | None = None, below: Tensor | None = None):
        w_hh = self.w_hh
        if weight_drop and self.training:  # DropConnect on W_hh, one mask per window, as run_layer applies it
            w_hh = torch.nn.functional.dropout(w_hh, weight_drop, True)
        depth = tuple(getattr(self, name) for name in DEPTH) if self.depth_gated else None
        if self.depth_gated and below is None:
            raise ValueError("a depth-gated dglstm layer needs the cells of the dglstm layer below (lmtrain.model.layer.stack_forward)")
        lower = below if self.depth_gated else None
        zone = self.zone(x)
        if zone is None:
            y, cells, final = kernel.run(x, lower, state, self.w_ih, w_hh, self.b_ih, depth, compute_dtype)
            return y, final, cells

        def window(x: Tensor, state: tuple[Tensor, ...], lower: Tensor | None = None):
            y, _, final = kernel.run(x, lower, state, self.w_ih, w_hh, self.b_ih, depth, compute_dtype)
            return y, final

        # zoneout: the kernel a step at a time, mixed between; the cells handed up are the zoned c
        return zoneout.stepwise(window, x, state, zone, lower, up=1)
