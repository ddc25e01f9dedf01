"""The recurrence engine: any cell over T steps, with hand-written backpropagation through time.

A cell (a module in lmtrain/model/cells/) supplies its gate count G, its state names (h first: h is the
layer's output), whether it keeps a separate recurrent bias, its extra per-unit parameters, and
two per-step functions: `forward_step` and `backward_step`. The engine does the rest:

Forward:
  1. one GEMM for the input projections of all steps:   xg = x W_ih^T + b_ih        (T, B, GH)
  2. per step t: one GEMM for the recurrent projection:  hg = h_{t-1} W_hh^T (+ b_hh) (B, GH),
     then the cell's pointwise forward turns (xg[t], hg, state_{t-1}) into state_t.
Backward, steps in reverse:
  per step: the cell's pointwise backward gives d xg[t], d hg[t] and the gradient of state_{t-1};
  one GEMM carries d hg[t] back to h_{t-1}: dh_{t-1} += d hg[t] W_hh.
  Then one GEMM each for dW_ih = dXG^T X, dW_hh = dHG^T H_prev and dX = dXG W_ih.

A cell may also offer `sequence_kernel`: a faster forward/backward over the whole sequence
(see lmtrain/model/kernels/); on CUDA every cell takes lmtrain.model.kernels.fused instead: the same
loop with each step's pointwise work compiled into one kernel and the per-step GEMMs into reused
buffers. lmtrain.model.kernels.dispatch chooses, for each call of `run_layer`, and says why; every
path computes the same thing as the loop above.

Mixed precision (`low` = torch.bfloat16, train.precision = bf16): every GEMM above takes bfloat16
operands and gives float32 sums (lmtrain.model.kernels.mixed); the cell's pointwise steps, its state
and the weight gradients stay float32.

Everything here is device-agnostic torch code.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from lmtrain.model.kernels import dispatch, fused, mixed


class Recurrence(torch.autograd.Function):
    """outputs = Recurrence.apply(cell, n_state, low, x, w_ih, w_hh, b_ih, b_hh, *state, *extra).

    low: None (float32 throughout) or torch.bfloat16 (mixed precision's GEMM operands);
    x: (T, B, I); w_ih: (GH, I); w_hh: (GH, H); b_ih: (GH,); b_hh: (GH,) or None;
    state: n_state tensors (B, H); extra: the cell's per-unit parameters.
    outputs: y (T, B, H) followed by the n_state final state tensors (B, H).
    """

    @staticmethod
    def forward(ctx, cell: ModuleType, n_state: int, low, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh, *rest):
        state, extra = tuple(rest[:n_state]), tuple(rest[n_state:])
        steps, batch, _ = x.shape
        w_ih, w_hh = mixed.operand(w_ih, low), mixed.operand(w_hh, low)
        # (T, B, GH): the input projections of all steps in one GEMM
        xg = mixed.mm(mixed.operand(x.reshape(steps * batch, -1), low), w_ih.t(), b_ih).view(steps, batch, -1)
        states, saved = [state], []
        w_hh_t = w_hh.t()
        for t in range(steps):
            hg = mixed.mm(mixed.operand(state[0], low), w_hh_t, b_hh)
            state, step_saved = cell.forward_step(xg[t], hg, state, extra)
            states.append(state)
            saved.append(step_saved)
        ctx.cell, ctx.has_b_hh, ctx.low = cell, b_hh is not None, low
        ctx.states, ctx.saved = states, saved  # per-step tuples: plain lists, not autograd inputs
        ctx.save_for_backward(x, w_ih, w_hh, *extra)  # the weights as the products took them
        y = torch.stack([s[0] for s in states[1:]])  # (T, B, H)
        return (y, *(s.clone() for s in state))

    @staticmethod
    def backward(ctx, dy: Tensor, *d_final):
        x, w_ih, w_hh, *extra = ctx.saved_tensors
        extra = tuple(extra)
        cell, low = ctx.cell, ctx.low
        steps, batch, _ = x.shape
        d_state = list(d_final)
        dxg = dhg = None
        d_extra = [torch.zeros_like(e) for e in extra]
        for t in reversed(range(steps)):
            d_state[0] = d_state[0] + dy[t]
            dxg_t, dhg_t, d_prev, d_extra_t = cell.backward_step(tuple(d_state), ctx.saved[t], ctx.states[t], extra)
            if dxg is None:
                dxg = dxg_t.new_empty(steps, *dxg_t.shape)
                dhg = dxg if dhg_t is dxg_t else dhg_t.new_empty(steps, *dhg_t.shape)
            dxg[t] = dxg_t
            if dhg is not dxg:
                dhg[t] = dhg_t
            d_state = list(d_prev)
            d_state[0] = mixed.mm(mixed.operand(dhg_t, low), w_hh, d_prev[0])
            for acc, d in zip(d_extra, d_extra_t):
                acc += d
        h_prev = torch.stack([s[0] for s in ctx.states[:-1]])  # (T, B, H): h_0 .. h_{T-1}
        dx, dw_ih, dw_hh, db_ih, db_hh = mixed.sequence_grads(dxg, dhg, x, h_prev, w_ih, low, ctx.needs_input_grad[3])
        db_hh = db_hh if ctx.has_b_hh else None
        return (None, None, None, dx, dw_ih, dw_hh, db_ih, db_hh, *d_state, *d_extra)


def run_layer(cell: ModuleType, x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor, b_hh: Tensor | None = None, extra: tuple[Tensor, ...] = (), weight_drop: float = 0.0,
              low: torch.dtype | None = None):
    """Run `cell` over x (T, B, I) from `state` -> y (T, B, H) and the final state (a tuple).

    low: torch.bfloat16 for mixed precision (bfloat16 GEMM operands, everything else float32), or
    None; ignored unless x is float32.

    weight_drop: DropConnect on the recurrent weight (Wan et al. 2013, as AWD-LSTM uses it): each
    entry of w_hh is zeroed with this probability, the rest scaled by 1 / (1 - p), one mask for the
    whole sequence; w_hh's gradient is masked the same way. 0 (inference) leaves w_hh as it is.
    """
    if weight_drop:
        w_hh = torch.nn.functional.dropout(w_hh, weight_drop, True)
    if x.dtype != torch.float32:
        low = None
    path = dispatch.choose(cell, x, state, w_ih, w_hh, b_ih, b_hh, extra, low).path
    if path in ("fused", "persistent"):
        return fused.run(cell, x, state, w_ih, w_hh, b_ih, b_hh, extra, low, persistent=path == "persistent")
    if path == "sequence":
        return cell.sequence_kernel.run(x, state, w_ih, w_hh, b_ih, b_hh, extra, low)
    outputs = Recurrence.apply(cell, len(state), low, x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
    return outputs[0], tuple(outputs[1:])
