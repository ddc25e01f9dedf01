"""Dynamic evaluation (Krause et al. 2018): adapt the weights to the text while scoring it.

The RMS-normalised variant with a global prior (the paper's section 5, the default of its code):

  1. gradient statistics, once, on the training split: MS = sqrt(mean over batches of g²) for
     every weight, from the mean loss of `stats_batch_size` streams × bptt tokens per batch;
  2. per parameter tensor a decay rate, MS / (the mean over tensors of mean(MS)), at most 1/decay;
  3. after each scored window of the evaluated text, with g its gradient:
        θ ← θ − lr · g / (MS + eps) + decay · rate ⊙ (θ_trained − θ)
     so weights follow the text and relax back towards the trained ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lmtrain.model import LanguageModel, detach_state
from lmtrain.text import EOS_ID, lazy_batchify, windows


@dataclass(frozen=True)
class DynamicSettings:
    lr: float = 5e-5  # η
    decay: float = 2e-3  # λ, the pull back to the trained weights
    eps: float = 2e-5  # ε
    bptt: int = 5  # tokens per scored window, i.e. between updates
    stats_batch_size: int = 100  # streams per batch of the gradient statistics
    stats_batches: int = 0  # batches of training text for the statistics (0: the whole split)


def gradient_stats(model: LanguageModel, tokens: np.ndarray, settings: DynamicSettings) -> list[Tensor]:
    """RMS of each parameter's gradient over batches of `tokens` (the training split), in eval mode."""
    model.eval()
    device = model.decoder.weight.device
    inputs, targets = lazy_batchify(tokens, settings.stats_batch_size, EOS_ID)
    sums = [torch.zeros_like(p) for p in trained_parameters(model)]
    state = model.init_state(settings.stats_batch_size)
    batches = 0
    for x, y in windows(inputs.to(device), targets.to(device), settings.bptt):
        model.zero_grad(set_to_none=True)
        logits, state = model(x, state)
        F.cross_entropy(logits.view(-1, model.vocab_size).float(), y.reshape(-1)).backward()
        for total, p in zip(sums, trained_parameters(model)):
            total += p.grad * p.grad
        state = detach_state(state)
        batches += 1
        if settings.stats_batches and batches >= settings.stats_batches:
            break
    model.zero_grad(set_to_none=True)
    return [torch.sqrt(total / max(batches, 1)) for total in sums]


def trained_parameters(model: LanguageModel) -> list[Tensor]:
    """The parameters training updates: all but a reservoir's fixed ones (model.reservoir)."""
    return [p for p in model.parameters() if p.requires_grad]


class DynamicEval:
    """The update of step 3, as the `adapt` callback of lmtrain.evaluation.stream.score_stream."""

    def __init__(self, model: LanguageModel, ms: list[Tensor], settings: DynamicSettings):
        self.params = trained_parameters(model)
        self.trained = [p.detach().clone() for p in self.params]
        self.ms = ms
        self.settings = settings
        mean_ms = sum(m.mean() for m in ms) / len(ms)
        # both factors of the update are fixed for the whole text: decay · rate and lr / (MS + eps)
        self.pull = [settings.decay * (m / mean_ms).clamp(max=1 / settings.decay) for m in ms]
        self.step = [settings.lr / (m + settings.eps) for m in ms]

    def __call__(self, loss: Tensor) -> None:
        for p in self.params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            towards = torch._foreach_sub(self.trained, self.params)  # θ_trained − θ
            torch._foreach_addcmul_(self.params, self.pull, towards)
            torch._foreach_addcmul_(self.params, self.step, grads, value=-1.0)
        for p in self.params:
            p.grad = None

    def restore(self) -> None:
        """Put the trained weights back."""
        with torch.no_grad():
            for p, trained in zip(self.params, self.trained):
                p.copy_(trained)
