"""Token-weighted negative log-likelihood and the perplexities derived from it."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lmtrain.model import LanguageModel
from lmtrain.tokenizer import EOS_ID
from lmtrain.tokens import TokenFile, batchify, windows


@torch.no_grad()
def total_nll(model: LanguageModel, tokens: np.ndarray, batch_size: int, bptt: int,
              decoder_dtype: torch.dtype | None = None) -> tuple[float, int]:
    """Sum of -log p(token) in nats over every token of `tokens`, and the number of tokens.

    decoder_dtype: as in training (LanguageModel.decode); None computes it all in the model's dtype.

    The split is laid out as `batch_size` padded streams (see `batchify`), each starting from a
    zero state, and the state is carried across windows as in training.
    """
    was_training = model.training
    model.eval()
    device = model.decoder.weight.device
    inputs, targets = batchify(tokens, batch_size, EOS_ID, pad=True)
    state = model.init_state(batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in windows(inputs.to(device), targets.to(device), bptt):
        logits, state = model(x, state, decoder_dtype)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction="sum")
    model.train(was_training)
    return total.item(), int((targets >= 0).sum())


def metrics(nll_sum: float, n_tokens: int, n_words: int, n_bytes: int) -> dict[str, float | int]:
    """Perplexities and bits per byte from a summed NLL (nats) over a text.

    n_words counts whitespace words plus line ends, the unit of word-level papers, so that
    word_ppl compares subword models with them; in word mode it equals ppl.
    """
    return {
        "tokens": n_tokens,
        "nll": nll_sum / n_tokens,
        "ppl": math.exp(nll_sum / n_tokens),
        "word_ppl": math.exp(nll_sum / n_words),
        "bits_per_byte": nll_sum / math.log(2) / n_bytes,
        "nll_sum": nll_sum,
        "words": n_words,
        "bytes": n_bytes,
    }


def evaluate(model: LanguageModel, token_file: TokenFile, batch_size: int, bptt: int) -> dict[str, float | int]:
    """All metrics of `model` on one encoded text."""
    nll_sum, n_tokens = total_nll(model, token_file.tokens, batch_size, bptt)
    return metrics(nll_sum, n_tokens, token_file.text_words + token_file.text_lines, token_file.text_bytes)


def combine(results: list[dict[str, float | int]]) -> dict[str, float | int]:
    """Metrics over several texts taken together (token-weighted, not an average of perplexities)."""
    return metrics(*(sum(r[k] for r in results) for k in ("nll_sum", "tokens", "words", "bytes")))
