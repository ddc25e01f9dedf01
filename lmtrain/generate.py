"""Sampling: prime the state with the prompt once, then one model step per new token.

The state is a fixed-size tuple per layer ((h, c) for the LSTM), so memory does not grow with the generated length.
Sampling runs on the CPU generator, so the same seed gives the same text on any device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lmtrain.model import LanguageModel
from lmtrain.tokenizer import EOS_ID


@torch.no_grad()
def sample(
    model: LanguageModel,
    prompt_ids: list[int],
    max_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every sample, (num_samples,) int64 on the CPU, `max_tokens` times.

    The context is `<eos>` (the start of a text) followed by `prompt_ids`; it runs through the
    model once as one sequence, and its final state is shared by all samples.
    """
    model.eval()
    device = model.decoder.weight.device
    context = torch.tensor([EOS_ID] + prompt_ids, dtype=torch.int64, device=device).unsqueeze(1)  # (T, 1)
    logits, state = model(context, model.init_state(1))
    state = [tuple(s.expand(num_samples, -1).contiguous() for s in layer_state) for layer_state in state]
    last = logits[-1].expand(num_samples, -1)  # (B, V)
    for _ in range(max_tokens):
        token = pick(last.float().cpu(), temperature, top_k, top_p, generator)
        yield token
        logits, state = model(token.to(device).unsqueeze(0), state)
        last = logits[0]


def pick(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row of logits (B, V) -> (B,). Temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p; the first always stays
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
