"""Matrix products with a fixed weight, the shape of every per-step GEMM in a recurrence.

`pack(w, rows)` prepares w (N, K) once per sequence; `linear(x, packed, add)` then gives
x (M, K) @ w^T (+ add) for each step. On CPU in float32 the weight is reordered once into
oneDNN's blocked layout (the layout torch.nn.LSTM's own oneDNN kernel uses), which measured
about 1.5-2x faster than an unpacked GEMM at batch 20 here; everywhere else (float64, bfloat16,
CUDA, or a torch without those oneDNN ops) it is a plain addmm.
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
def onednn_available() -> bool:
    """Whether this torch has the packed oneDNN linear ops and they give the right answer."""
    try:
        x, w = torch.randn(3, 5), torch.randn(4, 5)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        add = torch.randn(3, 4)
        y_add = torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, None, "add")
        return torch.allclose(y, x @ w.t(), atol=1e-4) and torch.allclose(y_add, x @ w.t() + add, atol=1e-4)
    except (AttributeError, RuntimeError):
        return False


def pack(weight: Tensor, rows: int) -> Packed:
    """Prepare weight (N, K) for products with inputs of `rows` rows."""
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available():
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
