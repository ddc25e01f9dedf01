"""The LSTM over a whole sequence with fewer, larger operations than the generic engine.

On the CPU the two time loops run in C++ (lstm_cpu.cpp, built on first use by torch's extension
loader and cached; one GEMM and one fused, vectorised pass over the gates per step). Where it
cannot be built (no compiler or ninja) or LMTRAIN_COMPILE=0, and on other devices, the same
loops run as Python code below.

Same equations and gate order (i, f, g, o) as lmtrain/model/cells/lstm.py, same results. What makes
it faster:

  - the recurrent weight is packed once per sequence, and each step's GEMM adds the step's
    input projection in the same call: gates_t = h_{t-1} W_hh^T + xg_t. On an AVX-512 CPU
    (bfloat16: with AVX512-BF16) the packing and the GEMM are ours (panel_gemm.h: the product lands in the step's
    slice of the buffer, with no allocation or library call per step); otherwise oneDNN's
    (lmtrain.model.kernels.gemm);
  - the forward writes c_t, tanh(c_t) and h_t straight into preallocated (T+1, B, H) buffers;
  - the backward computes every factor that does not depend on the incoming gradient for all
    steps at once, before the loop (T·B-sized operations instead of T small ones):

        pc = o ⊙ (1 − tanh²c)                    dc_t  += dh_t ⊙ pc
        q  = [g ⊙ σ'(i), c_{t-1} ⊙ σ'(f),        d(i, f, g) = dc_t ⊙ q[i, f, g]
              i ⊙ tanh'(g), tanh c ⊙ σ'(o)]      do         = dh_t ⊙ q[o]

    so each step is five operations: two multiplies into d gates, two updates of dc, and one
    packed GEMM that also adds the next step's output gradient: dh_{t-1} = d gates_t W_hh + dy_{t-1}.

Mixed precision (train.precision = bf16, MixedLSTMSequence): the same loops with every GEMM on
bfloat16 operands and float32 sums (AVX512-BF16 panels); gates, c, h and all gradients in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.kernels.gemm import Weight, linear, pack, plain, sequence_grads

PLAIN, ONEDNN, PANELS = 0, 1, 2  # the weight forms of lstm_cpu.cpp
LOW = torch.bfloat16  # mixed precision's operand type
# From this hidden size up, the backward's sequence-wide GEMMs (dX, dW) also run on our panels,
# which spares oneDNN's transposing copies of W_ih^T and the operands of dW. Measured here (2-layer
# stack, batch 20, bptt 35, ours / PyTorch's LSTM module): hidden 200: 1.01 with panels, 1.13 with oneDNN;
# 400: 1.02 / 0.98; 650: 1.07 / 1.02.
SEQUENCE_PANELS_MIN_HIDDEN = 300


class LSTMSequence(torch.autograd.Function):
    """y, h_T, c_T = LSTMSequence.apply(x, h_0, c_0, w_ih, w_hh, bias).

    x: (T, B, I); h_0, c_0: (B, H); w_ih: (4H, I); w_hh: (4H, H); bias: (4H,).
    y: (T, B, H); h_T, c_T: (B, H).
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor):
        steps, batch, _ = x.shape
        hidden = h0.size(1)
        flat_x = x.reshape(steps * batch, -1)
        # (T, B, 4H): input projections of all steps, turned into activations step by step
        acts = linear(flat_x, plain(w_ih), bias=bias).view(steps, batch, 4 * hidden)
        ops = cpu_ops() if x.device.type == "cpu" else None
        w_hh_step, mode = step_weight(ops, w_hh, batch)
        hs = x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T
        cs = x.new_empty(steps + 1, batch, hidden)  # c_0 .. c_T
        tanh_cs = x.new_empty(steps, batch, hidden)
        hs[0] = h0
        cs[0] = c0
        ctx.compiled = ops is not None
        if ops is not None:
            ops.lstm_forward_loop(acts, hs, cs, tanh_cs, w_hh_step.tensor, mode)
        else:
            for t in range(steps):
                g = linear(hs[t], w_hh_step, acts[t])  # (B, 4H) pre-activations, then activations in place
                g[:, : 2 * hidden].sigmoid_()
                g[:, 2 * hidden : 3 * hidden].tanh_()
                g[:, 3 * hidden :].sigmoid_()
                torch.mul(g[:, hidden : 2 * hidden], cs[t], out=cs[t + 1])
                cs[t + 1].addcmul_(g[:, :hidden], g[:, 2 * hidden : 3 * hidden])
                torch.tanh(cs[t + 1], out=tanh_cs[t])
                torch.mul(g[:, 3 * hidden :], tanh_cs[t], out=hs[t + 1])
                acts[t] = g
        ctx.save_for_backward(x, w_ih, w_hh, hs, cs, tanh_cs, acts)
        return hs[1:].clone(), hs[steps].clone(), cs[steps].clone()

    @staticmethod
    def backward(ctx, dy: Tensor, dh_last: Tensor, dc_last: Tensor):
        x, w_ih, w_hh, hs, cs, tanh_cs, acts = ctx.saved_tensors
        steps, batch, _ = x.shape
        hidden = hs.size(2)
        dgates = torch.empty_like(acts)
        ops = cpu_ops() if ctx.compiled else None
        # dh_{t-1} = d gates_t W_hh: a product with W_hh^T, the transposed view
        w_hh_t, mode = step_weight(ops, w_hh.t(), batch, packed=False)
        if ops is not None:
            dh, dc = ops.lstm_backward_loop(acts, cs, tanh_cs, dy, dh_last, dc_last, w_hh_t.tensor, mode, dgates)
        else:
            dh, dc = backward_loop(acts, cs, tanh_cs, dy, dh_last, dc_last, w_hh_t, dgates)
        del w_hh_t  # packed for the loop only
        flat = dgates.view(steps * batch, 4 * hidden)
        db = flat.sum(0)
        del dgates
        inputs, h_prev = x.reshape(steps * batch, -1), hs[:-1].reshape(steps * batch, hidden)
        grads = [flat, flat]
        del flat  # sequence_grads releases the gradient once read
        dx, dw_ih, dw_hh = sequence_grads(ops, grads, inputs, h_prev, w_ih, ctx.needs_input_grad[0],
                                          mode == PANELS and hidden >= SEQUENCE_PANELS_MIN_HIDDEN)
        return dx.view_as(x) if dx is not None else None, dh, dc, dw_ih, dw_hh, db


class MixedLSTMSequence(torch.autograd.Function):
    """LSTMSequence in mixed precision (train.precision = bf16) on a CPU with AVX512-BF16 and our ops.

    Every GEMM takes bfloat16 operands and keeps float32 sums (panel_gemm.h): the weights are
    rounded once per call, x, each h_{t-1} and each step's gate gradients as they are used. The
    activations, c_t, h_t, the gradients of the state and of the weights stay float32, so the
    cell state never loses precision across steps. Same signature and shapes as LSTMSequence;
    the same arithmetic as lmtrain.model.recurrence.Recurrence with compute_dtype = torch.bfloat16.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor):
        ops = cpu_ops()
        steps, batch, inputs = x.shape
        hidden = h0.size(1)
        x_low = x.detach().reshape(steps * batch, inputs).to(LOW)
        w_ih_low, w_hh_low = w_ih.detach().to(LOW), w_hh.detach().to(LOW)
        acts = ops.panels_matmul(x_low, ops.pack_panels(w_ih_low), 4 * hidden, torch.float32)
        acts = acts.add_(bias).view(steps, batch, 4 * hidden)  # (T, B, 4H) float32
        hs, cs = x.new_empty(steps + 1, batch, hidden), x.new_empty(steps + 1, batch, hidden)
        tanh_cs = x.new_empty(steps, batch, hidden)
        hs_low = x_low.new_empty(steps + 1, batch, hidden)  # h_t rounded: the products' operands
        hs[0], cs[0], hs_low[0] = h0, c0, h0
        ops.lstm_forward_loop(acts, hs, cs, tanh_cs, ops.pack_panels(w_hh_low), PANELS, hs_low)
        ctx.input_shape = x.shape
        ctx.save_for_backward(x_low, w_ih_low, w_hh_low, hs_low, cs, tanh_cs, acts)
        return hs[1:].clone(), hs[steps].clone(), cs[steps].clone()

    @staticmethod
    def backward(ctx, dy: Tensor, dh_last: Tensor, dc_last: Tensor):
        x_low, w_ih_low, w_hh_low, hs_low, cs, tanh_cs, acts = ctx.saved_tensors
        ops = cpu_ops()
        steps, batch, inputs = ctx.input_shape
        hidden = cs.size(2)
        dgates = torch.empty_like(acts)
        dgates_low = x_low.new_empty(batch, 4 * hidden)
        dh, dc = ops.lstm_backward_loop(acts, cs, tanh_cs, dy, dh_last, dc_last, ops.pack_panels(w_hh_low.t()), PANELS,
                                        dgates, dgates_low)
        flat = dgates.view(steps * batch, 4 * hidden)
        flat_low = flat.to(LOW)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = ops.panels_matmul(flat_low, ops.pack_panels(w_ih_low.t()), inputs, torch.float32).view(ctx.input_shape)
        flat_t = ops.transpose(flat_low)  # (4H, T·B)
        h_prev = hs_low[:-1].reshape(steps * batch, hidden)
        dw_ih = ops.panels_matmul(flat_t, ops.pack_panels(x_low.t()), inputs, torch.float32)
        dw_hh = ops.panels_matmul(flat_t, ops.pack_panels(h_prev.t()), hidden, torch.float32)
        return dx, dh, dc, dw_ih, dw_hh, flat.sum(0)


def mixed_available(x: Tensor) -> bool:
    """Whether MixedLSTMSequence can run on x: float32 on a CPU whose build has bfloat16 panels."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    ops = cpu_ops()
    return ops is not None and ops.panels_available(True)


def step_weight(ops, weight: Tensor, rows: int, packed: bool = True) -> tuple[Weight, int]:
    """weight (N, K) prepared for one product per step with `rows`-row inputs, and its form.

    With the compiled loops, float32 on an AVX-512 CPU or bfloat16 on one with AVX512-BF16: our
    panels (panel_gemm.h); otherwise oneDNN's packed layout (`packed`) or the weight as it is,
    strides and all.
    """
    if (ops is not None and weight.dtype in (torch.float32, torch.bfloat16)
            and ops.panels_available(weight.dtype == torch.bfloat16)):
        return Weight(ops.pack_panels(weight.detach()), False), PANELS
    prepared = pack(weight, rows) if packed else plain(weight)
    return prepared, ONEDNN if prepared.onednn else PLAIN


def backward_loop(acts: Tensor, cs: Tensor, tanh_cs: Tensor, dy: Tensor, dh_last: Tensor, dc_last: Tensor,
                  w_hh_t, dgates: Tensor) -> tuple[Tensor, Tensor]:
    """The reverse loop in Python, for when the compiled one is not there; fills dgates (T, B, 4H).

    Every factor that does not depend on the incoming gradient is computed for all steps first.
    """
    steps, batch, _ = acts.shape
    hidden = cs.size(2)
    i, f, g, o = acts.chunk(4, dim=2)  # each (T, B, H)
    pc = o * (1 - tanh_cs * tanh_cs)
    q = torch.empty_like(acts)
    qi, qf, qg, qo = q.chunk(4, dim=2)
    torch.mul(g, i * (1 - i), out=qi)
    torch.mul(cs[:-1], f * (1 - f), out=qf)
    torch.mul(i, 1 - g * g, out=qg)
    torch.mul(tanh_cs, o * (1 - o), out=qo)
    q_ifg = q.view(steps, batch, 4, hidden)[:, :, :3]  # (T, B, 3, H)
    dgates_ifg = dgates.view(steps, batch, 4, hidden)[:, :, :3]
    dh = dh_last + dy[steps - 1]
    dc = dc_last.clone()
    for t in reversed(range(steps)):
        dc.addcmul_(dh, pc[t])
        torch.mul(dh, qo[t], out=dgates[t, :, 3 * hidden :])
        torch.mul(dc.unsqueeze(1), q_ifg[t], out=dgates_ifg[t])
        dc.mul_(f[t])
        dh = linear(dgates[t], w_hh_t, dy[t - 1] if t > 0 else None)
    return dh, dc


def supports(x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype=None) -> bool:
    """Whether these tensors fit this kernel (LMTRAIN_KERNELS is dispatch's to read, before asking)."""
    return b_hh is None and not extra and (compute_dtype is None or mixed_available(x))


def run(x, state, w_ih, w_hh, b_ih, b_hh=None, extra=(), compute_dtype=None):
    """The engine's entry point: x (T, B, I), state (h, c) -> y (T, B, H), (h_T, c_T);
    compute_dtype = torch.bfloat16: mixed precision (MixedLSTMSequence)."""
    sequence = MixedLSTMSequence if compute_dtype is not None else LSTMSequence
    y, h, c = sequence.apply(x, state[0], state[1], w_ih, w_hh, b_ih)
    return y, (h, c)
