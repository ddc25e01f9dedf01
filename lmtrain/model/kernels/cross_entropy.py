"""Per-token cross-entropy of logits, fused: on the CPU one compiled op (cross_entropy_cpu.cpp),
on CUDA the same plan in torch operations, a block of rows at a time (ChunkedCrossEntropy).

    losses = cross_entropy(logits (N, V), targets (N,))  ->  (N,) float32, 0 where target < 0

Both keep only each row's log-sum-exp from the forward and write the gradient of the logits in
their own type: for the bfloat16 decoder that is the operand its backward GEMMs need, with no
float32 copy of the whole logits (about 0.75 GB per window at WikiText-2 AWD-LSTM's size), no
log-softmax tensor and no cast (lmtrain.model.language_model.LanguageModel.decode). Elsewhere
(float64, the CPU without compiled ops, LMTRAIN_KERNELS=0) it is F.cross_entropy on the logits
in float32, which computes the same, and which each fused form is checked against on first use
(lmtrain.model.kernels.selfcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.errors import LmtrainError
from lmtrain.model.kernels import kernels_enabled, selfcheck
from lmtrain.model.kernels.build import cpu_ops

CHECK_ROWS = 8  # rows of the first call's logits the fused op is checked on (selfcheck)
CHUNK_ROWS = 1024  # ChunkedCrossEntropy's block: its float32 working copy is CHUNK_ROWS x V


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


class ChunkedCrossEntropy(torch.autograd.Function):
    """The compiled op's plan in torch operations, for devices without it (CUDA): the log-sum-exp
    per block of CHUNK_ROWS rows in float32, only (N,) of it saved; the backward recomputes each
    block's softmax and writes that block's gradient in the logits' type."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        lse = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.size(0), CHUNK_ROWS):
            lse[start : start + CHUNK_ROWS] = torch.logsumexp(logits[start : start + CHUNK_ROWS].float(), dim=1)
        picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        return torch.where(targets >= 0, lse - picked, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        weight = torch.where(targets >= 0, grad.float(), 0.0)  # (N,): ignored rows get no gradient
        safe = targets.clamp(min=0)
        out = torch.empty_like(logits)
        for start in range(0, logits.size(0), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            block = (logits[rows].float() - lse[rows, None]).exp_().mul_(weight[rows, None])  # softmax x weight
            block.scatter_add_(1, safe[rows, None], -weight[rows, None])  # minus the target's one-hot
            out[rows] = block
        return out, None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (N, V) float32 or bfloat16, targets (N,) int64 (-1: ignored) -> losses (N,) float32."""
    if (kernels_enabled() and logits.dtype in (torch.float32, torch.bfloat16)
            and (logits.device.type != "cpu" or cpu_ops() is not None) and checked(logits, targets)):
        try:
            return fused(logits.contiguous(), targets.contiguous())
        except (torch.OutOfMemoryError, LmtrainError):
            raise
        except Exception as error:  # noqa: BLE001  a failure after the check: plain torch from now on
            selfcheck.turn_off("cross-entropy", selfcheck.raised(error), lambda: "F.cross_entropy")
    return reference(logits, targets)


def fused(logits: Tensor, targets: Tensor) -> Tensor:
    """The fused form for the logits' device: the compiled op on the CPU, ChunkedCrossEntropy elsewhere."""
    fused_form = CrossEntropy if logits.device.type == "cpu" else ChunkedCrossEntropy
    selfcheck.inject("cross-entropy")
    return selfcheck.distort("cross-entropy", [fused_form.apply(logits, targets)])[0]


def reference(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none")


def checked(logits: Tensor, targets: Tensor) -> bool:
    """Whether the fused op may run: not turned off, and its check on this kind of call passed
    (selfcheck; a failure turns it off, and F.cross_entropy takes over)."""
    if selfcheck.is_off("cross-entropy"):
        return False
    key = (logits.device, logits.dtype, logits.size(-1))
    if not selfcheck.pending("cross-entropy", key):  # checked before: the usual case, no check built
        return True
    rows = slice(0, CHECK_ROWS)
    failure = selfcheck.check("cross-entropy", key,
                              lambda l, t: [fused(l, t)], lambda l, t: [reference(l, t)],
                              [logits[rows].contiguous(), targets[rows].contiguous()], selfcheck.tolerance(logits.dtype))
    if failure is not None:
        selfcheck.turn_off("cross-entropy", failure, lambda: "F.cross_entropy")
    return failure is None
