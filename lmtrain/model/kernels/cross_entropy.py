"""Per-token cross-entropy of logits, fused on the CPU (cross_entropy_cpu.cpp).

    losses = cross_entropy(logits (N, V), targets (N,))  ->  (N,) float32, 0 where target < 0

The compiled op keeps only each row's log-sum-exp from the forward and writes the gradient of
the logits in their own type in one pass: for the bfloat16 decoder that is the operand its
backward GEMMs need, with no float32 copy of the logits, no log-softmax tensor and no cast
(lmtrain.model.language_model.LanguageModel.decode). Elsewhere (CUDA, float64, no compiled ops) it is
F.cross_entropy on the logits in float32, which computes the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.model.kernels import kernels_enabled
from lmtrain.model.kernels.build import cpu_ops


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        ops = cpu_ops()
        losses, lse = ops.cross_entropy_forward(logits, targets)
        ctx.save_for_backward(logits, targets, lse)
        return losses

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        return cpu_ops().cross_entropy_backward(logits, targets, lse, grad), None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (N, V) float32 or bfloat16, targets (N,) int64 (-1: ignored) -> losses (N,) float32."""
    if (kernels_enabled() and logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.bfloat16)
            and cpu_ops() is not None):
        return CrossEntropy.apply(logits.contiguous(), targets.contiguous())
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none")
