"""The recurrence engine: an LSTM layer over T steps with hand-written backpropagation through time.

Forward:
  1. one GEMM for the input projections of all steps: gates = x W_ih^T + b        (T, B, 4H)
  2. per step t: gates[t] += h_{t-1} W_hh^T (one GEMM), then the cell's pointwise math
     turns gates[t] into activations in place and writes c_t, tanh(c_t), h_t.
Backward, steps in reverse:
  per step: the pointwise backward gives d gates[t]; dh_{t-1} = d gates[t] W_hh (one GEMM).
  then one GEMM each for dW_ih = dG^T X, dW_hh = dG^T H_prev and dX = dG W_ih.

Saved for backward: the activations (T, B, 4H), the cell states c_0..c_T and h_0..h_T
(T+1, B, H), and tanh(c_t) (T, B, H). The code is device-agnostic: the same ops run on CPU and CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.cells import lstm


class LSTMFunction(torch.autograd.Function):
    """y, h_T, c_T = LSTMFunction.apply(x, h_0, c_0, w_ih, w_hh, bias).

    x: (T, B, I); h_0, c_0: (B, H); w_ih: (4H, I); w_hh: (4H, H); bias: (4H,).
    y: (T, B, H), the hidden state at every step; h_T, c_T: (B, H).
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor):
        steps, batch, _ = x.shape
        hidden = h0.size(1)
        # (T, B, 4H): input projections of all steps, turned into activations step by step
        acts = torch.addmm(bias, x.reshape(steps * batch, -1), w_ih.t()).view(steps, batch, lstm.GATES * hidden)
        hs = x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T
        cs = x.new_empty(steps + 1, batch, hidden)  # c_0 .. c_T
        tanh_cs = x.new_empty(steps, batch, hidden)
        hs[0] = h0
        cs[0] = c0
        w_hh_t = w_hh.t()
        for t in range(steps):
            acts[t].addmm_(hs[t], w_hh_t)
            lstm.pointwise_forward(acts[t], cs[t], cs[t + 1], tanh_cs[t], hs[t + 1])
        ctx.save_for_backward(x, w_ih, w_hh, acts, hs, cs, tanh_cs)
        return hs[1:].clone(), hs[steps].clone(), cs[steps].clone()

    @staticmethod
    def backward(ctx, dy: Tensor, dh_last: Tensor, dc_last: Tensor):
        x, w_ih, w_hh, acts, hs, cs, tanh_cs = ctx.saved_tensors
        steps, batch, _ = x.shape
        dgates = torch.empty_like(acts)  # (T, B, 4H)
        dh = dh_last.clone()
        dc = dc_last.clone()
        for t in reversed(range(steps)):
            dh += dy[t]
            dc = lstm.pointwise_backward(acts[t], cs[t], tanh_cs[t], dh, dc, dgates[t])
            dh = dgates[t] @ w_hh
        flat = dgates.view(steps * batch, -1)  # (T*B, 4H)
        dx = (flat @ w_ih).view_as(x) if ctx.needs_input_grad[0] else None
        dw_ih = flat.t() @ x.reshape(steps * batch, -1)
        dw_hh = flat.t() @ hs[:-1].reshape(steps * batch, -1)
        dbias = flat.sum(0)
        return dx, dh, dc, dw_ih, dw_hh, dbias


def lstm_layer(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, bias: Tensor):
    """Run one LSTM layer: x (T, B, I), state (h, c) each (B, H) -> y (T, B, H), (h_T, c_T)."""
    h0, c0 = state
    y, h, c = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, bias)
    return y, (h, c)
