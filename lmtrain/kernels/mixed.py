"""Mixed precision's products (train.precision = bf16): bfloat16 operands, float32 sums.

The weights stay float32: they are the master copy the optimizer updates. Each forward rounds
them to bfloat16 once, and every product rounds its other operand (x, h_{t-1}, a gate gradient)
the same way. What a product returns, the gate pre-activations, the cell state, every pointwise
step and the gradients that reach the weights all stay float32.

An operand is carried in the form its device multiplies fastest:

  CUDA: bfloat16 tensors, multiplied by cuBLAS with float32 output (torch.mm's out_dtype);
  CPU:  float32 tensors holding bfloat16 values. A product of two bfloat16 values is exact in
        float32, so the float32 GEMM gives the sums the bfloat16 one would, in its own order.
        This is the generic engine's path (any cell) and the tests' reference; the LSTM's CPU
        kernel takes bfloat16 itself (lmtrain.kernels.lstm, AVX512-BF16), which is where the
        speed is on a CPU.

With `low` None every function is the float32 operation the engine always ran.
"""

from __future__ import annotations

import torch
from torch import Tensor


def operand(t: Tensor, low: torch.dtype | None) -> Tensor:
    """t rounded to `low` in the form `mm` takes on t's device; t itself when low is None."""
    if low is None or t.dtype == low:
        return t
    rounded = t.to(low)
    return rounded if t.is_cuda else rounded.to(t.dtype)


def mm(a: Tensor, b: Tensor, add: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """a (M, K) @ b (K, N) (+ add, (M, N) or (N,)) in float32, the operands from `operand`."""
    if a.dtype == torch.bfloat16:  # CUDA: bfloat16 operands, float32 output
        product = torch.mm(a, b, out_dtype=torch.float32, out=out)
        return product if add is None else product.add_(add)
    if add is None:
        return torch.mm(a, b, out=out) if out is not None else a @ b
    return torch.addmm(add, a, b, out=out) if out is not None else torch.addmm(add, a, b)
