"""The depth-gated LSTM layer (lmtrain.model.cells.dglstm) over a window, with a hand-written backward.

One autograd Function for both forms of the layer: with its depth gate (a dglstm layer above a
dglstm layer; `lower` is that layer's cells c_t^{L-1}) and without (the LSTM, which also hands its
cells up). The pre-activations of a step, in columns:

    [ d | i f g o ]          (B, D + 4H), D = H with the depth gate, 0 without

Forward:
  1. one GEMM for the input side of every step, the depth gate's W_xd with the LSTM's W_ih:
         X = x [W_xd; W_ih]^T + [b_d; b_ih]                             (T, B, D + 4H)
  2. per step: one GEMM for the recurrence, X[t, :, D:] + h_{t-1} W_hh^T; then
         d = σ(X_d + w_ld ⊙ l_t + w_cd ⊙ c_{t-1})                       (l_t = lower[t])
         c_t = f ⊙ c_{t-1} + i ⊙ g + d ⊙ l_t,   h_t = o ⊙ tanh(c_t)
     each activation written over its pre-activation in one (T, B, D + 4H) buffer.
Backward: every factor that does not depend on the incoming gradient for all steps at once
(T·B-sized operations), as lmtrain.model.kernels.lstm does for the LSTM:

    pc = o ⊙ (1 − tanh² c_t)                                dc_t += dh_t ⊙ pc
    q  = [l_t ⊙ σ'(d), g ⊙ σ'(i), c_{t-1} ⊙ σ'(f), i ⊙ tanh'(g)]    d(d, i, f, g) = dc_t ⊙ q
    q_o = tanh c_t ⊙ σ'(o)                                  do = dh_t ⊙ q_o
    r  = f + q_d ⊙ w_cd                                     dc_{t-1} = dc_t ⊙ r (+ the gradient of l's c_{t-1})

so each step is five operations: the update of dc_t, two multiplies into the pre-activations'
gradient, the carry of dc to c_{t-1}, and one GEMM that also adds the next step's output
gradient: dh_{t-1} = d(i f g o)_t W_hh + dy_{t-1}. Then, for the whole window,
dl = dc ⊙ d + dd ⊙ w_ld (the lower layer's cells), dw_ld = Σ dd ⊙ l, dw_cd = Σ dd ⊙ c_{t-1}, and
one GEMM each for dx, d[W_xd; W_ih] and dW_hh (lmtrain.model.kernels.mixed.sequence_grads).

Mixed precision (compute_dtype bfloat16): every GEMM takes bfloat16 operands and sums in float32
(lmtrain.model.kernels.mixed); gates, cells, states and gradients stay float32. Device-agnostic
torch code: the same loop on the CPU and on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.kernels import mixed

Depth = tuple[Tensor, Tensor, Tensor, Tensor]  # w_xd (H, I), b_d (H,), w_ld (H,), w_cd (H,)


class DepthGatedLSTM(torch.autograd.Function):
    """y, cells, h_T, c_T = DepthGatedLSTM.apply(compute_dtype, x, lower, h0, c0, w_ih, w_hh, b_ih, w_xd, b_d, w_ld, w_cd)

    x: (T, B, I); lower: (T, B, H), the cells of the dglstm layer below, or None (no depth gate;
    w_xd, b_d, w_ld, w_cd None too); h0, c0: (B, H); w_ih: (4H, I); w_hh: (4H, H); b_ih: (4H,),
    gate order i, f, g, o. y: h_1 .. h_T and cells: c_1 .. c_T, (T, B, H) each.
    """

    @staticmethod
    def forward(ctx, compute_dtype, x, lower, h0, c0, w_ih, w_hh, b_ih, w_xd, b_d, w_ld, w_cd):
        steps, batch, inputs = x.shape
        hidden = w_hh.size(1)
        depth = lower is not None
        gate = hidden if depth else 0  # D: the columns of d before i, f, g, o
        width = gate + 4 * hidden
        w_in = torch.cat([w_xd, w_ih]) if depth else w_ih  # (D + 4H, I)
        b_in = torch.cat([b_d, b_ih]) if depth else b_ih
        w_in, w_hh = mixed.operand(w_in, compute_dtype), mixed.operand(w_hh, compute_dtype)
        acts = x.new_empty(steps, batch, width)  # pre-activations, then the gates' values in their place
        mixed.mm(mixed.operand(x.reshape(steps * batch, inputs), compute_dtype), w_in.t(), b_in,
                 out=acts.view(steps * batch, width))
        cs = x.new_empty(steps + 1, batch, hidden)  # c_0 .. c_T
        ys = x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T: the output and dW_hh's operand
        tanh_cs = x.new_empty(steps, batch, hidden)
        cs[0], ys[0] = c0, h0
        gates = x.new_empty(batch, 4 * hidden)  # each step's i, f, g, o pre-activations
        w_hh_t = w_hh.t()
        h_block = slice(gate, gate + 4 * hidden)
        for t in range(steps):
            mixed.mm(mixed.operand(ys[t], compute_dtype), w_hh_t, acts[t, :, h_block], out=gates)
            a = acts[t]
            torch.sigmoid(gates[:, : 2 * hidden], out=a[:, gate : gate + 2 * hidden])
            torch.tanh(gates[:, 2 * hidden : 3 * hidden], out=a[:, gate + 2 * hidden : gate + 3 * hidden])
            torch.sigmoid(gates[:, 3 * hidden :], out=a[:, gate + 3 * hidden :])
            i, f, g, o = a[:, gate:].chunk(4, dim=1)
            c = torch.mul(f, cs[t], out=cs[t + 1]).addcmul_(i, g)
            if depth:
                d = a[:, :gate].addcmul_(w_ld, lower[t]).addcmul_(w_cd, cs[t]).sigmoid_()
                c.addcmul_(d, lower[t])
            torch.mul(o, torch.tanh(c, out=tanh_cs[t]), out=ys[t + 1])
        ctx.compute_dtype, ctx.depth = compute_dtype, depth
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, lower, w_in, w_hh, w_ld, w_cd, acts, cs, tanh_cs, ys)  # the weights as the products took them
        return ys[1:].clone(), cs[1:].clone(), ys[-1].clone(), cs[-1].clone()

    @staticmethod
    def backward(ctx, dy, d_cells, dh_last, dc_last):
        x, lower, w_in, w_hh, w_ld, w_cd, acts, cs, tanh_cs, ys = ctx.saved_tensors
        compute_dtype, depth = ctx.compute_dtype, ctx.depth
        steps, batch, hidden = tanh_cs.shape
        gate = hidden if depth else 0
        by_cell = gate + 3 * hidden  # the columns whose gradient is dc ⊙ q: d, i, f, g
        blocks = by_cell // hidden
        if dy is None:
            dy = torch.zeros_like(tanh_cs)
        # the factors of every step at once (module docstring)
        d, i, f, g, o = (acts[..., :gate], *acts[..., gate:].chunk(4, dim=2))
        c_prev = cs[:-1]
        pc = o * (1 - tanh_cs * tanh_cs)
        q = acts.new_empty(steps, batch, by_cell)
        if depth:
            torch.mul(lower, d * (1 - d), out=q[..., :gate])
        torch.mul(g, i * (1 - i), out=q[..., gate : gate + hidden])
        torch.mul(c_prev, f * (1 - f), out=q[..., gate + hidden : gate + 2 * hidden])
        torch.mul(i, 1 - g * g, out=q[..., gate + 2 * hidden :])
        q_o = tanh_cs * o * (1 - o)
        r = torch.addcmul(f, q[..., :gate], w_cd) if depth else f
        # the loop: dcs[t] is the gradient of c_t, da[t] that of step t's pre-activations
        da = acts.new_empty(acts.shape)
        dcs = acts.new_empty(steps, batch, hidden)
        dcs[-1] = 0 if dc_last is None else dc_last
        if d_cells is not None:
            dcs[-1] += d_cells[-1]
        dh = dy[-1] if dh_last is None else dy[-1] + dh_last
        h_block = slice(gate, gate + 4 * hidden)
        for t in reversed(range(steps)):
            dcs[t].addcmul_(dh, pc[t])
            torch.mul(q[t].view(batch, blocks, hidden), dcs[t].unsqueeze(1), out=da[t, :, :by_cell].view(batch, blocks, hidden))
            torch.mul(dh, q_o[t], out=da[t, :, by_cell:])
            da_h = mixed.operand(da[t, :, h_block], compute_dtype)
            if t > 0:
                if d_cells is None:
                    torch.mul(dcs[t], r[t], out=dcs[t - 1])
                else:
                    torch.addcmul(d_cells[t - 1], dcs[t], r[t], out=dcs[t - 1])
                dh = mixed.mm(da_h, w_hh, dy[t - 1])
            else:
                dc0 = dcs[0] * r[0]
                dh0 = mixed.mm(da_h, w_hh)
        dx, dw_in, dw_hh, db_in, _ = mixed.sequence_grads(da, da[..., h_block], x, ys[:-1], w_in, compute_dtype,
                                                          ctx.needs_input_grad[1])
        dw_xd, dw_ih = dw_in[:gate], dw_in[gate:]
        db_d, db_ih = db_in[:gate], db_in[gate:]
        if not depth:
            return None, dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, None, None, None, None
        dd = da[..., :gate]
        d_lower = torch.addcmul(dcs * d, dd, w_ld) if ctx.needs_input_grad[2] else None
        dw_ld = (dd * lower).sum((0, 1))
        dw_cd = (dd * c_prev).sum((0, 1))
        return None, dx, d_lower, dh0, dc0, dw_ih, dw_hh, db_ih, dw_xd, db_d, dw_ld, dw_cd


def run(x: Tensor, lower: Tensor | None, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
        depth: Depth | None = None, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """A dglstm layer over x (T, B, I) from state (h, c) -> y (T, B, H), its cells (T, B, H), the final (h, c).

    lower and depth: the cells of the dglstm layer below and the depth gate's parameters, or both None
    (the LSTM). compute_dtype: torch.bfloat16 for mixed precision, or None; ignored unless x is float32."""
    if (lower is None) != (depth is None):
        raise ValueError("dglstm: the lower layer's cells and the depth gate's parameters go together")
    if x.dtype != torch.float32:
        compute_dtype = None
    w_xd, b_d, w_ld, w_cd = depth if depth is not None else (None,) * 4
    y, cells, h, c = DepthGatedLSTM.apply(compute_dtype, x, lower, *state, w_ih, w_hh, b_ih, w_xd, b_d, w_ld, w_cd)
    return y, cells, (h, c)
