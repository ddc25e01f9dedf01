"""A persistent LSTM kernel: one launch runs a whole window's time loop (issue 7's stretch item).

The fused path (lmtrain.model.kernels.fused) costs a cuBLAS GEMM and a pointwise kernel per time step,
forward and backward: at batch 20 a step's work is a few microseconds, so launches, not
arithmetic, set the pace. Here one Triton program owns BLOCK_B streams (batch rows) for the whole
window and loops over the time steps itself; streams never depend on each other, so programs need
no grid-wide synchronisation, only a barrier inside the program between writing h_t and reading it
back as the next step's operand. Each step reads W_hh again, but from L2, where a window's
repeated reads keep it (FlashRNN keeps it in registers and shared memory, splitting the hidden
units across programs with a grid barrier; this simpler form splits the batch instead).

    forward:  xg = x W_ih^T + b (one GEMM), then one launch:
              for t: gates = xg[t] + h_{t-1} W_hh^T (tl.dot per 32-unit tile), the LSTM's
              pointwise step, h_t and c_t written to hs[t + 1], cs[t + 1]
    backward: one launch: for t = T-1 .. 0: d gates_t from dh, dc (pointwise), then
              dh_{t-1} = d gates_t W_hh (tl.dot); then dX, dW_ih, dW_hh as one GEMM each

Shapes: x (T, B, I); h_0, c_0 (B, H); W_ih (4H, I); W_hh (4H, H); b (4H,); gate order i, f, g, o
(lmtrain/model/cells/lstm.py). Arithmetic in float32 (tl.dot with ieee precision, no TF32); with
compute_dtype = torch.bfloat16 (train.precision = bf16) the dots take bfloat16 operands and sum in float32,
as lmtrain.model.kernels.mixed does for every other product.

Used on CUDA for the LSTM when LMTRAIN_PERSISTENT=1 (lmtrain.model.kernels.fused). It is off by default
because it has not yet been timed on a GPU: whether, and below which batch and hidden size, it
beats the per-step path is for `lmtrain bench --device cuda` to decide. Without a GPU it runs
under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported), which is how
tests/test_lstm_persistent.py checks it against the engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lmtrain.model.kernels import mixed
from lmtrain.model.kernels.cuda.lstm_triton import _sigmoid, _tanh

BLOCK_B, BLOCK_N, BLOCK_K = 16, 32, 32  # streams per program; units and reduction per tile (tl.dot needs >= 16)


@triton.jit
def _dot(a, b, acc, LOW: tl.constexpr):
    """acc + a @ b, float32 sums: with LOW = 1 bfloat16 operands (tensor cores), with LOW = 2 the
    same values rounded to bfloat16 and multiplied in float32 (the interpreter, whose bfloat16
    dot is not exact), else float32 operands without TF32.

    One return, the branches exclusive: the compiler type-checks code after a `return` inside a
    constexpr `if` too, and a float32-by-bfloat16 tl.dot there does not compile (the interpreter
    runs Python's return and never sees it; tests/test_triton_aot.py does)."""
    if LOW == 1:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:
        if LOW == 2:
            a = _round_bf16(a)
            b = _round_bf16(b)
        out = tl.dot(a, b, acc, input_precision="ieee")
    return out


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept in float32; by bits, since
    the interpreter's own conversion truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


def low_mode(compute_dtype, x: Tensor) -> int:
    """_dot's LOW for a run in `compute_dtype` on x's device."""
    return 0 if compute_dtype is None else 1 if x.is_cuda else 2


@triton.jit
def forward_kernel(xg, w_hh_t, hs, cs, acts, tanh_cs, steps, batch, hidden,
                   LOW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """xg (T, B, 4H): x W_ih^T + b; w_hh_t (H, 4H) contiguous; hs, cs (T+1, B, H) with h_0, c_0
    at [0], filled; acts (T, B, 4H) filled with i, f, g, o; tanh_cs (T, B, H) filled."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    width = 4 * hidden
    for t in range(steps):
        h_prev = hs + t * batch * hidden
        for n0 in range(0, hidden, BLOCK_N):
            units = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (units < hidden)[None, :]
            gates = xg + t * batch * width + rows[:, None] * width + units[None, :]
            a_i = tl.load(gates, mask=ok, other=0.0).to(tl.float32)
            a_f = tl.load(gates + hidden, mask=ok, other=0.0).to(tl.float32)
            a_g = tl.load(gates + 2 * hidden, mask=ok, other=0.0).to(tl.float32)
            a_o = tl.load(gates + 3 * hidden, mask=ok, other=0.0).to(tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                h = tl.load(h_prev + rows[:, None] * hidden + ks[None, :], mask=row_ok[:, None] & (ks < hidden)[None, :],
                            other=0.0)
                w = w_hh_t + ks[:, None] * width + units[None, :]
                w_ok = (ks < hidden)[:, None] & (units < hidden)[None, :]
                a_i = _dot(h, tl.load(w, mask=w_ok, other=0.0), a_i, LOW)
                a_f = _dot(h, tl.load(w + hidden, mask=w_ok, other=0.0), a_f, LOW)
                a_g = _dot(h, tl.load(w + 2 * hidden, mask=w_ok, other=0.0), a_g, LOW)
                a_o = _dot(h, tl.load(w + 3 * hidden, mask=w_ok, other=0.0), a_o, LOW)
            i = _sigmoid(a_i)
            f = _sigmoid(a_f)
            g = _tanh(a_g)
            o = _sigmoid(a_o)
            at = rows[:, None] * hidden + units[None, :]
            c = f * tl.load(cs + t * batch * hidden + at, mask=ok, other=0.0) + i * g
            tc = _tanh(c)
            out = acts + t * batch * width + rows[:, None] * width + units[None, :]
            tl.store(out, i, mask=ok)
            tl.store(out + hidden, f, mask=ok)
            tl.store(out + 2 * hidden, g, mask=ok)
            tl.store(out + 3 * hidden, o, mask=ok)
            tl.store(cs + (t + 1) * batch * hidden + at, c, mask=ok)
            tl.store(tanh_cs + t * batch * hidden + at, tc, mask=ok)
            tl.store(hs + (t + 1) * batch * hidden + at, o * tc, mask=ok)
        tl.debug_barrier()  # h_t written by every thread of the program before any reads it


@triton.jit
def backward_kernel(acts, cs, tanh_cs, dy, w_hh, dgates, dh, dc, steps, batch, hidden,
                    LOW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acts (T, B, 4H), cs (T+1, B, H), tanh_cs, dy (T, B, H); w_hh (4H, H) contiguous;
    dgates (T, B, 4H) filled; dh, dc (B, H): on entry the gradients reaching h_T, c_T from
    outside the window, on return those of h_0, c_0."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    width = 4 * hidden
    for step in range(steps):
        t = steps - 1 - step
        for n0 in range(0, hidden, BLOCK_N):  # d gates_t, and dc carried to step t - 1
            units = n0 + tl.arange(0, BLOCK_N)
            ok = row_ok[:, None] & (units < hidden)[None, :]
            at = rows[:, None] * hidden + units[None, :]
            gate = acts + t * batch * width + rows[:, None] * width + units[None, :]
            i = tl.load(gate, mask=ok, other=0.0)
            f = tl.load(gate + hidden, mask=ok, other=0.0)
            g = tl.load(gate + 2 * hidden, mask=ok, other=0.0)
            o = tl.load(gate + 3 * hidden, mask=ok, other=0.0)
            tc = tl.load(tanh_cs + t * batch * hidden + at, mask=ok, other=0.0)
            d_h = tl.load(dh + at, mask=ok, other=0.0) + tl.load(dy + t * batch * hidden + at, mask=ok, other=0.0)
            d_c = tl.load(dc + at, mask=ok, other=0.0) + d_h * o * (1.0 - tc * tc)
            c_prev = tl.load(cs + t * batch * hidden + at, mask=ok, other=0.0)
            out = dgates + t * batch * width + rows[:, None] * width + units[None, :]
            tl.store(out, d_c * g * i * (1.0 - i), mask=ok)
            tl.store(out + hidden, d_c * c_prev * f * (1.0 - f), mask=ok)
            tl.store(out + 2 * hidden, d_c * i * (1.0 - g * g), mask=ok)
            tl.store(out + 3 * hidden, d_h * tc * o * (1.0 - o), mask=ok)
            tl.store(dc + at, d_c * f, mask=ok)
        tl.debug_barrier()  # d gates_t complete, and every read of dh done, before dh is rewritten
        step_dgates = dgates + t * batch * width
        for n0 in range(0, hidden, BLOCK_N):  # dh_{t-1} = d gates_t W_hh
            units = n0 + tl.arange(0, BLOCK_N)
            acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: a jit function the interpreter misses when triton was imported first
            for k0 in range(0, width, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                d = tl.load(step_dgates + rows[:, None] * width + ks[None, :], mask=row_ok[:, None] & (ks < width)[None, :],
                            other=0.0)
                w = tl.load(w_hh + ks[:, None] * hidden + units[None, :], mask=(ks < width)[:, None] & (units < hidden)[None, :],
                            other=0.0)
                acc = _dot(d, w, acc, LOW)
            tl.store(dh + rows[:, None] * hidden + units[None, :], acc, mask=row_ok[:, None] & (units < hidden)[None, :])
        tl.debug_barrier()  # dh_{t-1} complete before step t - 1 reads it


class PersistentLSTM(torch.autograd.Function):
    """y, h_T, c_T = PersistentLSTM.apply(compute_dtype, x, h_0, c_0, w_ih, w_hh, bias): the signature and
    results of lmtrain.model.kernels.lstm.LSTMSequence, with compute_dtype None or torch.bfloat16; float32 tensors."""

    @staticmethod
    def forward(ctx, compute_dtype, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor):
        steps, batch, inputs = x.shape
        hidden = h0.size(1)
        w_ih_c, w_hh_c = mixed.operand(w_ih.detach(), compute_dtype), mixed.operand(w_hh.detach(), compute_dtype)
        x_c = mixed.operand(x.detach().reshape(steps * batch, inputs), compute_dtype)
        xg = mixed.mm(x_c, w_ih_c.t(), bias.detach()).view(steps, batch, 4 * hidden)
        hs, cs = x.new_empty(steps + 1, batch, hidden), x.new_empty(steps + 1, batch, hidden)
        hs[0], cs[0] = h0, c0
        acts, tanh_cs = torch.empty_like(xg), x.new_empty(steps, batch, hidden)
        forward_kernel[(triton.cdiv(batch, BLOCK_B),)](
            xg, w_hh_c.t().contiguous(), hs, cs, acts, tanh_cs, steps, batch, hidden,
            LOW=low_mode(compute_dtype, x), BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(x_c, w_ih_c, w_hh_c, hs, cs, tanh_cs, acts)
        ctx.input_shape = x.shape
        return hs[1:].clone(), hs[steps].clone(), cs[steps].clone()

    @staticmethod
    def backward(ctx, dy: Tensor, dh_last: Tensor, dc_last: Tensor):
        x_c, w_ih_c, w_hh_c, hs, cs, tanh_cs, acts = ctx.saved_tensors
        compute_dtype = ctx.compute_dtype
        steps, batch, _ = ctx.input_shape
        hidden = cs.size(2)
        dgates = torch.empty_like(acts)
        dh = dh_last.contiguous().clone()
        dc = dc_last.contiguous().clone()
        backward_kernel[(triton.cdiv(batch, BLOCK_B),)](
            acts, cs, tanh_cs, dy.contiguous(), w_hh_c.contiguous(), dgates, dh, dc, steps, batch, hidden,
            LOW=low_mode(compute_dtype, dy), BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
        dx, dw_ih, dw_hh, db, _ = mixed.sequence_grads(dgates, dgates, x_c.view(ctx.input_shape), hs[:-1], w_ih_c, compute_dtype,
                                                       ctx.needs_input_grad[1])
        return None, dx, dh, dc, dw_ih, dw_hh, db


def supports(cell_name: str, x: Tensor, b_hh, extra) -> bool:
    """The LSTM without a separate recurrent bias or extras, on float32 input."""
    return cell_name == "lstm" and b_hh is None and not extra and x.dtype == torch.float32


def run(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, compute_dtype=None):
    """x (T, B, I), (h_0, c_0) -> y (T, B, H), (h_T, c_T)."""
    y, h, c = PersistentLSTM.apply(compute_dtype, x, state[0], state[1], w_ih, w_hh, b_ih)
    return y, (h, c)
