"""Token-weighted negative log-likelihood and the perplexities derived from it.

`total_nll` scores a text as `batch_size` parallel streams; `evaluate_stream` as one stream, with
dynamic evaluation (lmtrain.evaluation.dynamic) and the continuous cache (lmtrain.evaluation.cache) when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmtrain.errors import LmtrainError
from lmtrain.evaluation.cache import cache_probs, mix, tune
from lmtrain.evaluation.dynamic import DynamicEval
from lmtrain.evaluation.stream import score_stream
from lmtrain.model import LanguageModel
from lmtrain.text import EOS_ID, TokenFile, lazy_batchify, windows


@torch.no_grad()
def total_nll(model: LanguageModel, tokens: np.ndarray, batch_size: int, bptt: int,
              compute_dtype: torch.dtype | None = None, streams: slice = slice(None)) -> tuple[float, int]:
    """Sum of -log p(token) in nats over every token of `tokens`, and the number of tokens.

    compute_dtype: as in training (LanguageModel.forward); None computes it all in the model's dtype.
    streams: score only these of the `batch_size` streams (one rank's share, lmtrain.training.distributed).

    The split is laid out as `batch_size` padded streams (see `lazy_batchify`), each starting from a
    zero state, and the state is carried across windows as in training.
    """
    inputs, targets = lazy_batchify(tokens, batch_size, EOS_ID, pad=True)  # windows built from the memmap
    inputs, targets = inputs[:, streams].contiguous(), targets[:, streams].contiguous()
    if inputs.size(1) == 0:
        return 0.0, 0
    was_training = model.training
    model.eval()
    device = model.decoder.weight.device
    state = model.init_state(inputs.size(1))
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in windows(inputs.to(device), targets.to(device), bptt):
        logits, state = model(x, state, compute_dtype)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction="sum")
        count += (y >= 0).sum()  # padding (-1) is not scored; all streams together predict every token once
    model.train(was_training)
    return total.item(), int(count)


def metrics(nll_sum: float, n_tokens: int, n_words: int, n_bytes: int, n_chars: int = 0) -> dict[str, float | int | None]:
    """Perplexities, bits per byte and per character from a summed NLL (nats) over a text.

    n_words counts whitespace words plus line ends, the unit of word-level papers, so that
    word_ppl compares subword models with them; in word mode it equals ppl. Bytes and characters
    count one newline per line; bits_per_char is None when the character count is not known.
    """
    if n_tokens == 0 or n_words == 0 or n_bytes == 0:  # the corpus checks refuse such texts before they get here
        raise LmtrainError("nothing to score: the text encodes to no tokens")
    return {
        "tokens": n_tokens,
        "nll": nll_sum / n_tokens,
        "ppl": math.exp(nll_sum / n_tokens),
        "word_ppl": math.exp(nll_sum / n_words),
        "bits_per_byte": nll_sum / math.log(2) / n_bytes,
        "bits_per_char": nll_sum / math.log(2) / n_chars if n_chars else None,
        "nll_sum": nll_sum,
        "words": n_words,
        "bytes": n_bytes,
        "chars": n_chars,
    }


def text_metrics(nll_sum: float, n_tokens: int, token_file: TokenFile) -> dict[str, float | int | None]:
    """`metrics` with the text's counts from its token file."""
    t = token_file
    return metrics(nll_sum, n_tokens, t.text_words + t.text_lines, t.text_bytes, t.text_chars)


def evaluate(model: LanguageModel, token_file: TokenFile, batch_size: int, bptt: int) -> dict[str, float | int]:
    """All metrics of `model` on one encoded text."""
    nll_sum, n_tokens = total_nll(model, token_file.tokens, batch_size, bptt)
    return text_metrics(nll_sum, n_tokens, token_file)


def combine(results: list[dict[str, float | int]]) -> dict[str, float | int]:
    """Metrics over several texts taken together (token-weighted, not an average of perplexities)."""
    chars = 0 if any(not r["chars"] for r in results) else sum(r["chars"] for r in results)
    return metrics(*(sum(r[k] for r in results) for k in ("nll_sum", "tokens", "words", "bytes")), chars)


@dataclass(frozen=True)
class CacheSettings:
    window: int = 500  # previous positions the pointer looks at (AWD-LSTM's PTB setting)
    theta: float = 1.0  # inverse temperature of the pointer's softmax
    lam: float = 0.1  # weight of the cache in the mixture


def evaluate_stream(model: LanguageModel, token_file: TokenFile, bptt: int, dynamic: DynamicEval | None = None,
                    cache: CacheSettings | None = None) -> dict[str, float | int]:
    """All metrics of `model` on one text scored as a single stream (batch 1), with dynamic
    evaluation and/or the continuous cache; the model's trained weights are restored after."""
    try:
        log_probs, targets, hidden = score_stream(model, token_file.tokens, bptt, dynamic, keep_hidden=cache is not None)
    finally:
        if dynamic is not None:
            dynamic.restore()
    if cache is not None:
        log_probs = mix(log_probs, cache_probs(targets, hidden, cache.window, cache.theta), cache.lam)
    nll_sum = -log_probs.sum().item()
    return text_metrics(nll_sum, targets.numel(), token_file)


def tune_cache(model: LanguageModel, token_file: TokenFile, bptt: int, window: int,
               thetas=(0.1, 0.2, 0.3, 0.5, 0.7, 1.0), lams=(0.05, 0.1, 0.15, 0.2, 0.3)) -> CacheSettings:
    """The cache's theta and lambda with the lowest NLL on `token_file` (the validation split)."""
    log_probs, targets, hidden = score_stream(model, token_file.tokens, bptt, keep_hidden=True)
    theta, lam, _ = tune(log_probs, targets, hidden, window, thetas, lams)
    return CacheSettings(window, theta, lam)
