"""Matrix products with a fixed weight, the shape of every GEMM in a recurrence.

`pack(w, rows)` prepares w (N, K) for many products with inputs of `rows` rows (the per-step
recurrent GEMM of the forward loop); `plain(w)` for one product, or for a weight that is a
transposed view (the backward's W_hh and W_ih); `linear(x, weight, add=..., bias=...)` then gives
x (M, K) @ w^T (+ add (M, N)) (+ bias (N,)).

On CPU in float32 and bfloat16 these are oneDNN's inner products (torch.ops.mkldnn, the library
PyTorch's own LSTM module uses on CPUs): `pack` reorders the weight once into oneDNN's blocked
layout, which measured 1.2-2x faster than an unpacked GEMM at batch 20 here; `plain` hands oneDNN
the weight in place, strides and all, which measured faster than transposing and packing it when
it is used only once per sequence (W_ih), and faster per step too for W_hh^T. Everywhere else
(float64, CUDA, or a torch without those ops) they are plain addmm.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Weight:
    tensor: Tensor  # (N, K), any strides, or oneDNN's packed copy
    onednn: bool


@cache
def onednn_available(dtype: torch.dtype) -> bool:
    """Whether this torch has the oneDNN linear ops for `dtype` and they give the right answer."""
    try:
        generator = torch.Generator().manual_seed(0)  # its own: a run's draws must not depend on this check
        x, w, add, bias = (torch.randn(*shape, generator=generator) for shape in ((3, 5), (4, 5), (3, 4), (4,)))
        x, w, add, bias = (t.to(dtype) for t in (x, w, add, bias))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        w_t = w.t().contiguous().t()  # a transposed view
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").float()
        y_bias = torch.ops.mkldnn._linear_pointwise(x, w_t, bias, "none", [], "").float()
        y_add = torch.ops.mkldnn._linear_pointwise.binary(x, add, packed, None, "add").float()
        x, w, add, bias = x.float(), w.float(), add.float(), bias.float()
        tol = 1e-4 if dtype == torch.float32 else 0.1
        return (torch.allclose(y, x @ w.t(), atol=tol) and torch.allclose(y_bias, x @ w.t() + bias, atol=tol)
                and torch.allclose(y_add, x @ w.t() + add, atol=tol))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _use_onednn(weight: Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and onednn_available(weight.dtype)


def pack(weight: Tensor, rows: int) -> Weight:
    """Prepare weight (N, K) for many products with inputs of `rows` rows."""
    if _use_onednn(weight):
        return Weight(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows), True)
    return Weight(weight, False)


def plain(weight: Tensor) -> Weight:
    """Use weight (N, K) as it is, a transposed view included."""
    return Weight(weight.detach(), _use_onednn(weight))


def linear(x: Tensor, weight: Weight, add: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x (M, K) @ weight^T (M, N), plus `add` (M, N) and `bias` (N,) when given (not both)."""
    assert add is None or bias is None
    if weight.onednn:
        if add is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight.tensor, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, add, weight.tensor, None, "add")
    if add is None and bias is None:
        return x @ weight.tensor.t()
    return torch.addmm(add if add is not None else bias, x, weight.tensor.t())


def weight_grad(grad_out: Tensor, inputs: Tensor) -> Tensor:
    """grad_out (M, N)^T @ inputs (M, K) -> (N, K): a layer's weight gradient summed over M rows.

    oneDNN takes both operands as transposed views; it measured about 1.3x faster than mm for
    the large hidden sizes and slower for small ones, so it is used from 4·256 outputs up.
    """
    if _use_onednn(inputs) and grad_out.size(1) >= 1024:
        return torch.ops.mkldnn._linear_pointwise(grad_out.t(), inputs.t(), None, "none", [], "")
    return grad_out.t() @ inputs


def sequence_grads(ops, grads: list[Tensor], inputs: Tensor, h_prev: Tensor, w_ih: Tensor, need_dx: bool,
                   panels: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """A recurrent layer's sequence-wide GEMMs on the CPU, from the gradients of its two
    pre-activations, grads = [dXG, dHG] (T·B, GH) each (one object twice where they are equal):
    dX = dXG W_ih, dW_ih = dXG^T X, dW_hh = dHG^T H_prev -> (dx (T·B, I) or None, dw_ih, dw_hh).

    `grads` is emptied as they are used, so that (with the caller holding no other reference)
    each gradient's memory goes as soon as its last product has read it: the backward's peak is
    then one (T·B, GH) buffer and the operands of one product, not both gradients and every copy.

    panels (our ops, float32 on AVX-512, hidden sizes from SEQUENCE_PANELS_MIN_HIDDEN): our panel
    GEMM with one transposing copy per gradient; else oneDNN or at::mm (linear, weight_grad)."""
    flat_xg = grads[0]
    dx = (ops.panels_matmul(flat_xg, ops.pack_panels(w_ih.t()), w_ih.size(1)) if panels
          else linear(flat_xg, plain(w_ih.t()))) if need_dx else None
    shared = grads[1] is flat_xg
    if panels:
        xg_t = ops.transpose(flat_xg)  # (GH, T·B)
        grads[0] = flat_xg = None
        if shared:
            grads.clear()
        dw_ih = ops.panels_matmul(xg_t, ops.pack_panels(inputs.t()), inputs.size(1))
        if not shared:
            del xg_t
            xg_t = ops.transpose(grads.pop())
            grads.clear()
        return dx, dw_ih, ops.panels_matmul(xg_t, ops.pack_panels(h_prev.t()), h_prev.size(1))
    dw_ih = weight_grad(flat_xg, inputs)
    grads[0] = flat_xg = None
    dw_hh = weight_grad(grads.pop(), h_prev)
    grads.clear()
    return dx, dw_ih, dw_hh
