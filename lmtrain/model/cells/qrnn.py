"""The quasi-recurrent cell (Bradbury, Merity, Xiong & Socher 2017, "Quasi-Recurrent Neural Networks").

The gates come from a masked convolution over the inputs alone, of width 1 or 2 in time
(model.qrnn_window), and the recurrence is elementwise: there is no recurrent matrix.

    window 1:  [z̃, f̃, õ] = W x_t + b                    W (3H, I)
    window 2:  [z̃, f̃, õ] = W [x_{t-1}; x_t] + b         W (3H, 2I), x_{t-1} first
    z = tanh(z̃), f = σ(f̃), o = σ(õ)
    c_t = f ⊙ c_{t-1} + (1 − f) ⊙ z                     fo-pooling
    h_t = o ⊙ c_t

Gate order in the 3H-wide pre-activations is z, f, o. The layer's parameters are w_ih = W and
b_ih = b (the standard layer's names for the input weight and its bias, so model.recurrent_init
and model.forget_bias act on them as on any cell's). h_{t-1} enters nothing: the state's h is
only the last output, kept so that h comes first as in every cell's state.

State: (h, c), each (B, H), for window 1; (h, c, x_prev) for window 2, where x_prev (B, I) is
the last input of the previous window: the first step of a window sees it as x_{t-1}, so a run
over windows (and a resume from a checkpoint, which stores the carried state) equals one run over
the whole sequence. The initial x_prev is zeros, as the authors' code starts.

weight_drop (model.weight_drop): DropConnect on W, the cell's only matrix (AWD-LSTM wrapped its
QRNN's linear layers in its WeightDrop): each entry zeroed with that probability, the rest scaled
by 1 / (1 − p), one mask per window, in training only; W's gradient is masked alike.

The fast path, `run`, is one autograd.Function over the window (QRNNWindow):
  forward:  one GEMM for the gates of every step (T·B rows; with compute_dtype bfloat16, bfloat16
            operands and float32 sums, lmtrain.model.kernels.mixed), the activations and
            g = (1 − f) ⊙ z over the whole window, then a loop over t of one fused op,
            c_t = g_t + f_t ⊙ c_{t-1} (addcmul), and h = o ⊙ c over the window again.
  backward: the only sequential part is dc_t = o_t ⊙ dh_t + f_{t+1} ⊙ dc_{t+1}, again one
            addcmul per step in reverse; every gate's gradient is then elementwise over the
            whole window, and one GEMM each gives dW and the inputs' gradient.
Why a loop and not a parallel scan: c_t = f_t c_{t-1} + g_t is a linear recurrence, which a
Hillis-Steele scan does in log2(T) passes over the whole window, but each pass costs two or three
ops on (T, B, H) tensors where the loop costs one op on (B, H) per step. benchmarks/qrnn_scan.py
times both (one thread; the forward recurrence alone, T = 35, B = 20): the scan took 3.2x the
loop's time at H = 200 and 2.2x at H = 650 (docs/cells.md). The loop stays.

`reference` is the same equations in plain autograd, a step at a time; tests/test_qrnn.py holds
the fast path to it.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.config import ModelConfig
from lmtrain.model.kernels import mixed
from lmtrain.model.layer import RecurrentLayer

GATES = 3  # z, f, o
STATE = ("h", "c")  # window 1; window 2 adds x_prev (Layer.state_widths)
RECURRENT_BIAS = False
EXTRA: dict[str, tuple[str, ...]] = {}
FORGET_GATE = 1  # block of the forget gate in the pre-activations (model.forget_bias)


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, b_ih: Tensor, window: int = 1):
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h, c) or (h, c, x_prev)."""
    h, c, *rest = state
    x_prev = rest[0] if window == 2 else None
    outputs = []
    for x_t in x:
        source = x_t if window == 1 else torch.cat([x_prev, x_t], 1)
        z, f, o = (source @ w_ih.t() + b_ih).chunk(3, dim=1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        c = f * c + (1 - f) * z
        h = o * c
        outputs.append(h)
        x_prev = x_t
    return torch.stack(outputs), (h, c) if window == 1 else (h, c, x_prev)


class QRNNWindow(torch.autograd.Function):
    """outputs = QRNNWindow.apply(compute_dtype, x, w_ih, b_ih, c0, x_prev).

    x: (T, B, I); w_ih: (3H, I) or, with x_prev (B, I) given (window 2), (3H, 2I); b_ih: (3H,);
    c0: (B, H); x_prev: None for window 1.
    outputs: y (T, B, H), h_T (B, H), c_T (B, H), and for window 2 x_T (B, I).
    """

    @staticmethod
    def forward(ctx, compute_dtype, x: Tensor, w_ih: Tensor, b_ih: Tensor, c0: Tensor, x_prev: Tensor | None):
        steps, batch, inputs = x.shape
        hidden = w_ih.size(0) // 3
        # the convolution's input at each step: x_t, or [x_{t-1}; x_t]   (T, B, I) or (T, B, 2I)
        source = x if x_prev is None else torch.cat([torch.cat([x_prev.unsqueeze(0), x[:-1]]), x], 2)
        source = mixed.operand(source.reshape(steps * batch, -1), compute_dtype)
        w = mixed.operand(w_ih, compute_dtype)
        gates = mixed.mm(source, w.t(), b_ih).view(steps, batch, 3 * hidden)  # (T, B, 3H), float32 sums
        z, f, o = gates[..., :hidden].tanh(), gates[..., hidden : 2 * hidden].sigmoid(), gates[..., 2 * hidden :].sigmoid()
        g = (1 - f).mul_(z)  # (T, B, H): what each step adds, (1 − f) ⊙ z
        c = x.new_empty(steps + 1, batch, hidden)  # c_0 .. c_T
        c[0] = c0
        for t in range(steps):
            torch.addcmul(g[t], f[t], c[t], out=c[t + 1])
        y = o * c[1:]
        ctx.compute_dtype, ctx.window2, ctx.inputs = compute_dtype, x_prev is not None, inputs
        ctx.save_for_backward(source, w, z, f, o, c)  # the GEMM's operands as it took them
        outputs = (y, y[-1].clone(), c[-1].clone())
        return outputs if x_prev is None else (*outputs, x[-1].clone())

    @staticmethod
    def backward(ctx, dy: Tensor, dh_last: Tensor, dc_last: Tensor, *dx_last):
        source, w, z, f, o, c = ctx.saved_tensors
        compute_dtype, inputs = ctx.compute_dtype, ctx.inputs
        steps, batch, hidden = z.shape
        dh = dy.clone()  # (T, B, H): each step's whole dh_t, the final state's included
        dh[-1] += dh_last
        u = dh * o  # the direct part of dc_t
        dc = torch.empty_like(u)  # dc_t, the whole gradient of c_t
        dc[-1] = u[-1] + dc_last
        for t in reversed(range(steps - 1)):
            torch.addcmul(u[t], f[t + 1], dc[t + 1], out=dc[t])
        dc0 = dc[0] * f[0]
        dgates = u.new_empty(steps, batch, 3 * hidden)  # d z̃, d f̃, d õ
        torch.mul(dc * (1 - f), 1 - z * z, out=dgates[..., :hidden])
        torch.mul(dc * (c[:-1] - z), f * (1 - f), out=dgates[..., hidden : 2 * hidden])
        torch.mul(dh * c[1:], o * (1 - o), out=dgates[..., 2 * hidden :])
        flat = dgates.view(steps * batch, 3 * hidden)
        db = flat.sum(0)
        flat = mixed.operand(flat, compute_dtype)
        dw = mixed.mm(flat.t(), source)
        dx = dx_prev = None
        if ctx.needs_input_grad[1] or (ctx.window2 and ctx.needs_input_grad[5]):
            dsource = mixed.mm(flat, w).view(steps, batch, -1)  # (T, B, I) or (T, B, 2I)
            if not ctx.window2:
                dx = dsource
            else:  # x_t is the second half of step t's input and the first half of step t+1's
                dx = dsource[..., inputs:].clone()
                dx[:-1] += dsource[1:, :, :inputs]
                dx[-1] += dx_last[0]
                dx_prev = dsource[0, :, :inputs].clone()
        return None, dx, dw, db, dc0, dx_prev


def run(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, b_ih: Tensor, window: int = 1,
        compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The fast path over one window: what `reference` computes, x (T, B, I) -> y (T, B, H), final state.
    compute_dtype: torch.bfloat16 for mixed precision (the GEMMs' operands), or None."""
    _, c, *rest = state
    outputs = QRNNWindow.apply(compute_dtype, x, w_ih, b_ih, c, rest[0] if window == 2 else None)
    return outputs[0], tuple(outputs[1:])


class Layer(RecurrentLayer):
    """One QRNN layer: w_ih (3H, I) or (3H, 2I) for window 2, b_ih (3H,); no W_hh (lmtrain.model.layer)."""

    def __init__(self, cell: ModuleType, input_size: int, hidden_size: int, config: ModelConfig | None = None,
                 below: ModuleType | None = None):
        super().__init__(cell, input_size, hidden_size, config, below)  # below: the same layer on any cell
        self.window = (config or ModelConfig()).qrnn_window
        self.widths = self.state_widths(cell, input_size, hidden_size, config)

    @staticmethod
    def shapes(cell: ModuleType, input_size: int, hidden_size: int, config=None,
               below: ModuleType | None = None) -> dict[str, tuple[int, ...]]:
        window = (config or ModelConfig()).qrnn_window
        return {"w_ih": (GATES * hidden_size, window * input_size), "b_ih": (GATES * hidden_size,)}

    @staticmethod
    def state_widths(cell: ModuleType, input_size: int, hidden_size: int, config=None) -> dict[str, int]:
        window = (config or ModelConfig()).qrnn_window
        return {"h": hidden_size, "c": hidden_size} | ({"x_prev": input_size} if window == 2 else {})

    def init_state(self, batch_size: int, like: Tensor) -> tuple[Tensor, ...]:
        return tuple(like.new_zeros(batch_size, width) for width in self.widths.values())

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weight_drop: float = 0.0,
                compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        w = F.dropout(self.w_ih, weight_drop, True) if weight_drop and self.training else self.w_ih
        if x.dtype != torch.float32:
            compute_dtype = None
        return run(x, state, w, self.b_ih, self.window, compute_dtype)
