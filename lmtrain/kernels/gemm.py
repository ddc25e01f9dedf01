"""Matrix products with a fixed weight, the shape of every per-step GEMM in a recurrence.

`pack(w, rows)` prepares w (N, K) once per sequence; `linear(x, packed, add)` then gives
x (M, K) @ w^T (+ add) for each step. On CPU in float32 and bfloat16 the weight is reordered
once into oneDNN's blocked layout (the layout PyTorch's own LSTM module uses in its oneDNN kernel), which
measured 1.2-2x faster than an unpacked GEMM at batch 20 here; everywhere else (float64, CUDA,
or a torch without those oneDNN ops) it is a plain addmm.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packed:
    weight: Tensor  # (N, K) as given, or oneDNN's packed copy
    onednn: bool


@cache
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this torch has the packed oneDNN linear ops for `dtype` and they give the right answer."""
    try:
        x, w, add = torch.randn(3, 5), torch.randn(4, 5), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), 3)
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "").float()
        y_add = torch.ops.mkldnn._linear_pointwise.binary(x.to(dtype), add.to(dtype), packed, None, "add").float()
        tol = 1e-4 if dtype == torch.float32 else 0.1
        return torch.allclose(y, x @ w.t(), atol=tol) and torch.allclose(y_add, x @ w.t() + add, atol=tol)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack(weight: Tensor, rows: int) -> Packed:
    """Prepare weight (N, K) for products with inputs of `rows` rows."""
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and onednn_available(weight.dtype):
        return Packed(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows), True)
    return Packed(weight, False)


def linear(x: Tensor, packed: Packed, add: Tensor | None = None) -> Tensor:
    """x (M, K) @ weight^T (M, N), plus `add` (M, N) when given."""
    if packed.onednn:
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed.weight, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, packed.weight, None, "add")
    if add is None:
        return x @ packed.weight.t()
    return torch.addmm(add, x, packed.weight.t())
