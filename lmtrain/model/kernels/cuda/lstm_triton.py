"""Hand-written Triton kernels for the LSTM's pointwise step, forward and backward: one launch each.

Drop-in replacements for lmtrain.model.cells.lstm.forward_step / backward_step (same arguments, same
results, same saved tensors), used by lmtrain.model.kernels.fused on CUDA when
LMTRAIN_CUDA_POINTWISE=triton. Which of these and torch.compile's generated kernels is faster is
to be measured on a GPU (lmtrain bench --device cuda); that has not been done yet.

Both kernels run one program per BLOCK of the B·H (row, unit) pairs; each pair reads its four
gates from the 4H-wide rows:

    xg, hg, acts, dgates: (B, 4H)   [ i | f | g | o ], each block H wide
    c, h, tanh c, dh, dc:  (B, H)

Arithmetic is float32 for float32 and bfloat16 inputs and float64 for float64 (tests). Without a
GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
this module is imported), which is how tests/test_lstm_triton.py checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 256  # (row, unit) pairs per program


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh through exp of a non-positive argument: no overflow for large |x|
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def forward_kernel(xg, hg, c, acts, c_new, tanh_c, h_new, n, hidden, xg_row, hg_row, c_row,
                   COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = offs // hidden
    unit = offs % hidden
    x_at = xg + row * xg_row + unit
    h_at = hg + row * hg_row + unit
    a_i = tl.load(x_at, mask=mask).to(COMPUTE) + tl.load(h_at, mask=mask).to(COMPUTE)
    a_f = tl.load(x_at + hidden, mask=mask).to(COMPUTE) + tl.load(h_at + hidden, mask=mask).to(COMPUTE)
    a_g = tl.load(x_at + 2 * hidden, mask=mask).to(COMPUTE) + tl.load(h_at + 2 * hidden, mask=mask).to(COMPUTE)
    a_o = tl.load(x_at + 3 * hidden, mask=mask).to(COMPUTE) + tl.load(h_at + 3 * hidden, mask=mask).to(COMPUTE)
    i = _sigmoid(a_i)
    f = _sigmoid(a_f)
    g = _tanh(a_g)
    o = _sigmoid(a_o)
    c_prev = tl.load(c + row * c_row + unit, mask=mask).to(COMPUTE)
    c_next = f * c_prev + i * g
    tc = _tanh(c_next)
    out_acts = acts + row * 4 * hidden + unit
    tl.store(out_acts, i, mask=mask)
    tl.store(out_acts + hidden, f, mask=mask)
    tl.store(out_acts + 2 * hidden, g, mask=mask)
    tl.store(out_acts + 3 * hidden, o, mask=mask)
    tl.store(c_new + offs, c_next, mask=mask)
    tl.store(tanh_c + offs, tc, mask=mask)
    tl.store(h_new + offs, o * tc, mask=mask)


@triton.jit
def backward_kernel(dh, dc, acts, tanh_c, c_prev, dgates, dc_prev, n, hidden, dh_row, dc_row, c_row,
                    COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = offs // hidden
    unit = offs % hidden
    at = acts + row * 4 * hidden + unit
    i = tl.load(at, mask=mask).to(COMPUTE)
    f = tl.load(at + hidden, mask=mask).to(COMPUTE)
    g = tl.load(at + 2 * hidden, mask=mask).to(COMPUTE)
    o = tl.load(at + 3 * hidden, mask=mask).to(COMPUTE)
    tc = tl.load(tanh_c + offs, mask=mask).to(COMPUTE)
    d_h = tl.load(dh + row * dh_row + unit, mask=mask).to(COMPUTE)
    d_c = tl.load(dc + row * dc_row + unit, mask=mask).to(COMPUTE) + d_h * o * (1.0 - tc * tc)
    c_old = tl.load(c_prev + row * c_row + unit, mask=mask).to(COMPUTE)
    out = dgates + row * 4 * hidden + unit
    tl.store(out, d_c * g * i * (1.0 - i), mask=mask)
    tl.store(out + hidden, d_c * c_old * f * (1.0 - f), mask=mask)
    tl.store(out + 2 * hidden, d_c * i * (1.0 - g * g), mask=mask)
    tl.store(out + 3 * hidden, d_h * tc * o * (1.0 - o), mask=mask)
    tl.store(dc_prev + offs, d_c * f, mask=mask)


def compute_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def unit_stride(t: Tensor) -> Tensor:
    """t with its last dimension contiguous (the kernels step rows by stride, units by 1)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def forward_step(xg: Tensor, hg: Tensor, state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """lmtrain.model.cells.lstm.forward_step in one launch: xg, hg (B, 4H), state (h, c) (B, H) ->
    (h', c'), (acts (B, 4H), tanh c' (B, H))."""
    xg, hg, c = unit_stride(xg), unit_stride(hg), unit_stride(state[1])
    batch, hidden = c.shape
    acts = xg.new_empty(batch, 4 * hidden)
    c_new, tanh_c, h_new = (c.new_empty(batch, hidden) for _ in range(3))
    n = batch * hidden
    forward_kernel[(triton.cdiv(n, BLOCK),)](xg, hg, c, acts, c_new, tanh_c, h_new, n, hidden,
                                             xg.stride(0), hg.stride(0), c.stride(0),
                                             COMPUTE=compute_type(c.dtype), BLOCK=BLOCK)
    return (h_new, c_new), (acts, tanh_c)


def backward_step(d_state: tuple[Tensor, ...], saved: tuple[Tensor, ...], state: tuple[Tensor, ...], extra: tuple[Tensor, ...]):
    """lmtrain.model.cells.lstm.backward_step in one launch: d xg = d hg (B, 4H), (None, dc) (B, H), ()."""
    dh, dc = unit_stride(d_state[0]), unit_stride(d_state[1])
    acts, tanh_c = saved
    c_prev = unit_stride(state[1])
    batch, hidden = c_prev.shape
    dgates = torch.empty_like(acts)
    dc_prev = torch.empty_like(tanh_c)
    n = batch * hidden
    backward_kernel[(triton.cdiv(n, BLOCK),)](dh, dc, acts, tanh_c, c_prev, dgates, dc_prev, n, hidden,
                                              dh.stride(0), dc.stride(0), c_prev.stride(0),
                                              COMPUTE=compute_type(acts.dtype), BLOCK=BLOCK)
    return dgates, dgates, (None, dc_prev), ()
