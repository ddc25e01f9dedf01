"""Scoring a text as one stream, token by token, optionally learning from it as it goes.

    tokens ─ windows of `bptt` ─▶ model ─▶ log p(token | all text before it)   (N,) float64
                                        └▶ the last layer's output that predicted it (N, H_L)
                                  after each window, if `adapt`: a gradient step on that window

Every token is scored before anything learns from it: `adapt` sees a window's loss only after
the window's log-probabilities are recorded, and the cache (lmtrain.evaluation.cache) reads only the
outputs and targets of earlier positions. The state is carried from window to window.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from lmtrain.model import LanguageModel, detach_state
from lmtrain.text import EOS_ID, batchify, windows


def score_stream(model: LanguageModel, tokens: np.ndarray, bptt: int,
                 adapt: Callable[[Tensor], None] | None = None,
                 keep_hidden: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Each token's log-probability (N,) float64 with the text before it as context, the targets
    (N,) int64, and the last layer's outputs (N, H_L) float32 when `keep_hidden`.

    adapt(loss): called after each window with the window's mean NLL (a graph to the
    parameters), for dynamic evaluation; without it nothing needs gradients.
    """
    model.eval()
    device = model.decoder.weight.device
    inputs, targets = batchify(tokens, 1, EOS_ID)  # (N, 1): one stream, every token a target
    inputs, targets = inputs.to(device), targets.to(device)
    state = model.init_state(1)
    log_probs, hiddens = [], []
    for x, y in windows(inputs, targets, bptt):
        with torch.set_grad_enabled(adapt is not None):
            picked, raw, state = window_log_probs(model, x, y, state)
            picked = picked.view(-1)
        log_probs.append(picked.detach().double())
        if keep_hidden:
            hiddens.append(raw.detach().view(-1, raw.size(-1)).float())
        if adapt is not None:
            adapt(-picked.mean())
        state = detach_state(state)
    hidden = torch.cat(hiddens) if keep_hidden else None
    return torch.cat(log_probs), targets.view(-1), hidden


def window_log_probs(model: LanguageModel, x: Tensor, y: Tensor, state) -> tuple[Tensor, Tensor, list]:
    """One window (T, B) of inputs `x` and targets `y` from `state`: log p(y) (T, B) float32 (a
    padded target, -1, gets the log-probability of id 0: mask it), the last layer's outputs
    (T, B, H_L) and the new state. In eval mode nothing is dropped."""
    raw, _, state = model.hidden(x, state)
    logits = model.decode(raw).view(-1, model.vocab_size).float()
    picked = torch.log_softmax(logits, -1).gather(1, y.reshape(-1, 1).clamp(min=0)).view(y.shape)
    return picked, raw, state
