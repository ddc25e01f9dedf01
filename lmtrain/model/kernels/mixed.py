"""Mixed precision's products (train.precision = bf16): bfloat16 operands, float32 sums.

The weights stay float32: they are the master copy the optimizer updates. Each forward rounds
them to bfloat16 once, and every product rounds its other operand (x, h_{t-1}, a gate gradient)
the same way. What a product returns, the gate pre-activations, the cell state, every pointwise
step and the gradients that reach the weights all stay float32.

An operand is carried in the form its device multiplies fastest:

  CUDA: bfloat16 tensors, multiplied by cuBLAS with float32 output (torch.mm's out_dtype);
  CPU:  float32 tensors holding bfloat16 values. A product of two bfloat16 values is exact in
        float32, so the float32 GEMM gives the sums the bfloat16 one would, in its own order.
        This is the generic engine's path (any cell) and the tests' reference; the cells' CPU
        loops take bfloat16 themselves (lmtrain.model.kernels.lstm and cell_sequence, AVX512-BF16),
        which is where the speed is on a CPU.

With `compute_dtype` None every function is the float32 operation the engine always ran.
"""

from __future__ import annotations

import torch
from torch import Tensor


def operand(t: Tensor, compute_dtype: torch.dtype | None) -> Tensor:
    """t rounded to `compute_dtype` in the form `mm` takes on t's device; t itself when compute_dtype is None."""
    if compute_dtype is None or t.dtype == compute_dtype:
        return t
    rounded = t.to(compute_dtype)
    return rounded if t.is_cuda else rounded.to(t.dtype)


def linear(a: Tensor, w: Tensor, compute_dtype: torch.dtype | None) -> Tensor:
    """a (..., I) @ w (O, I)^T with both operands rounded as `operand` rounds them: the references'
    product, beside which the fast paths' `mm` is held."""
    return operand(a, compute_dtype) @ operand(w, compute_dtype).t()


def mm(a: Tensor, b: Tensor, add: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """a (M, K) @ b (K, N) (+ add, (M, N) or (N,)) in float32, the operands from `operand`."""
    if a.dtype == torch.bfloat16 and a.device.type != "cpu":  # CUDA: bfloat16 operands, float32 output (a bfloat16
        # operand on the CPU is a bfloat16 tensor's own, whose product stays bfloat16)
        product = torch.mm(a, b, out_dtype=torch.float32, out=out)
        return product if add is None else product.add_(add)
    if add is None:
        return torch.mm(a, b, out=out) if out is not None else a @ b
    return torch.addmm(add, a, b, out=out) if out is not None else torch.addmm(add, a, b)


def sequence_grads(dxg: Tensor, dhg: Tensor, x: Tensor, h_prev: Tensor, w_ih: Tensor, compute_dtype: torch.dtype | None,
                   need_dx: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
    """The sequence-wide GEMMs that end a recurrence's backward, one each.

    dxg, dhg: (T, B, GH) gradients of the input and recurrent projections (dhg may be dxg);
    x: (T, B, I); h_prev: (T, B, H), h_0 .. h_{T-1}; w_ih: (GH, I) as the forward's products took it.
    -> dx (T, B, I) or None, dW_ih (GH, I), dW_hh (GH, H), and the sums of dxg and dhg over T·B
    (the biases' gradients).
    """
    rows = dxg.size(0) * dxg.size(1)
    db_xg, db_hg = dxg.reshape(rows, -1).sum(0), dhg.reshape(rows, -1).sum(0)
    flat_xg = operand(dxg.reshape(rows, -1), compute_dtype)  # (T·B, GH)
    flat_hg = flat_xg if dhg is dxg else operand(dhg.reshape(rows, -1), compute_dtype)
    dx = mm(flat_xg, w_ih).view_as(x) if need_dx else None
    dw_ih = mm(flat_xg.t(), operand(x.reshape(rows, -1), compute_dtype))
    dw_hh = mm(flat_hg.t(), operand(h_prev.reshape(rows, -1), compute_dtype))
    return dx, dw_ih, dw_hh, db_xg, db_hg
