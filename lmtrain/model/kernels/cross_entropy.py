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

from lmtrain.errors import LmtrainError, one_line
from lmtrain.model.kernels import kernels_enabled, selfcheck
from lmtrain.model.kernels.build import cpu_ops

CHECK_ROWS = 8  # rows of the first call's logits the fused op is checked on (selfcheck)


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        selfcheck.inject("cross-entropy")
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
            and cpu_ops() is not None and checked(logits, targets)):
        try:
            return fused(logits.contiguous(), targets.contiguous())
        except (torch.OutOfMemoryError, LmtrainError):
            raise
        except Exception as error:  # noqa: BLE001  a failure after the check: plain torch from now on
            selfcheck.turn_off("cross-entropy", f"it raised {type(error).__name__}: {one_line(str(error), 160)}",
                               lambda: "F.cross_entropy")
    return reference(logits, targets)


def fused(logits: Tensor, targets: Tensor) -> Tensor:
    return selfcheck.distort("cross-entropy", [CrossEntropy.apply(logits, targets)])[0]


def reference(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none")


def checked(logits: Tensor, targets: Tensor) -> bool:
    """Whether the fused op may run: not turned off, and its check on this kind of call passed
    (selfcheck; a failure turns it off, and F.cross_entropy takes over)."""
    if selfcheck.is_off("cross-entropy"):
        return False
    rows = slice(0, CHECK_ROWS)
    failure = selfcheck.check("cross-entropy", ("cross-entropy", logits.dtype, logits.size(-1)),
                              lambda l, t: [fused(l, t)], lambda l, t: [reference(l, t)],
                              [logits[rows].contiguous(), targets[rows].contiguous()], selfcheck.tolerance(logits.dtype))
    if failure is not None:
        selfcheck.turn_off("cross-entropy", failure, lambda: "F.cross_entropy")
    return failure is None
