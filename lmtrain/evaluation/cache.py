"""The continuous cache pointer (Grave et al. 2017), on the scores of lmtrain.evaluation.stream.

For position t with last-layer output h_t, the cache looks at the previous `window` positions
j (their outputs h_j and the words y_j that followed them) and puts

    p_cache(w) = Σ_{j: y_j = w} softmax_j(theta · h_t · h_j)

then scores the mixture p(w) = (1 − lam) p_model(w) + lam p_cache(w). Only earlier positions
are read, so every word is scored before the cache holds it. The first position, with nothing
in the cache, keeps p_model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK = 1024  # positions scored per block of the score matrix


def cache_probs(targets: Tensor, hidden: Tensor, window: int, theta: float) -> Tensor:
    """p_cache of each target (N,) float64; 0 at the first position.

    targets (N,) int64: the word each position predicts; hidden (N, H) float32: the last layer's
    output that predicted it.
    """
    n = targets.numel()
    p_cache = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    for start in range(0, n, CHUNK):
        end = min(n, start + CHUNK)
        first = max(0, start - window)
        scores = theta * (hidden[start:end] @ hidden[first:end].t())  # (C, K)
        t = torch.arange(start, end, device=hidden.device).view(-1, 1)
        j = torch.arange(first, end, device=hidden.device).view(1, -1)
        scores = scores.masked_fill((j >= t) | (j < t - window), -math.inf)  # earlier positions only
        weights = torch.softmax(scores, dim=1).nan_to_num_(0.0)  # the first position: no history, no weight
        same = targets[first:end].view(1, -1) == targets[start:end].view(-1, 1)
        p_cache[start:end] = (weights * same).sum(1).double()
    return p_cache


def mix(log_probs: Tensor, p_cache: Tensor, lam: float) -> Tensor:
    """log((1 − lam) p_model + lam p_cache) of each target; the first position keeps log p_model."""
    mixed = ((1 - lam) * log_probs.exp() + lam * p_cache).log()
    mixed[0] = log_probs[0]
    return mixed


def tune(log_probs: Tensor, targets: Tensor, hidden: Tensor, window: int, thetas, lams) -> tuple[float, float, float]:
    """The (theta, lam) of the grids with the lowest total NLL on these scores, and that NLL."""
    best = (math.inf, 0.0, 0.0)
    for theta in thetas:
        p_cache = cache_probs(targets, hidden, window, theta)
        for lam in lams:
            best = min(best, (-mix(log_probs, p_cache, lam).sum().item(), theta, lam))
    return best[1], best[2], best[0]
