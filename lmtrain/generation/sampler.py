"""Sampling: prime the state with the prompt once, then one step per new token (lmtrain.generation.stepper).

The state is a fixed-size tuple per layer ((h, c) for the LSTM), so memory does not grow with the
generated length. Each stream draws from its own generator, seeded `seed + stream`, by inverting
the cumulative distribution with one uniform number per token; since the stepper computes every
stream on its own, stream i of a batch gives the same text as a batch of one seeded `seed + i`.
The generators are CPU ones, so a seed gives the same draws on any device.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lmtrain.generation.stepper import Stepper
from lmtrain.model import LanguageModel, step_ops
from lmtrain.text import EOS_ID

UNIFORM_CHUNK = 256  # uniforms drawn per stream at a time (the same chunks whatever the batch)


@dataclass(frozen=True)
class SampleSettings:
    """What `lmtrain generate` draws: `num_samples` samples of up to `max_tokens` tokens each,
    each ending before the first of `stops` it produces."""

    max_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    stops: tuple[str, ...] = ()


class StreamRandom:
    """One generator per stream, seeded seed, seed + 1, ...; `next()` -> (B,) uniforms in [0, 1)."""

    def __init__(self, seed: int, streams: int):
        self.generators = [torch.Generator().manual_seed(seed + i) for i in range(streams)]
        self.drawn = torch.empty(streams, UNIFORM_CHUNK)
        self.buffer = torch.empty(UNIFORM_CHUNK, streams)  # step-major, so each step's uniforms are contiguous
        self.used = UNIFORM_CHUNK

    def next(self) -> Tensor:
        if self.used == UNIFORM_CHUNK:
            for row, generator in zip(self.drawn, self.generators):
                torch.rand(UNIFORM_CHUNK, generator=generator, out=row)
            self.buffer.copy_(self.drawn.t())
            self.used = 0
        self.used += 1
        return self.buffer[self.used - 1]


class Sampler:
    """One model's sampling state: `feed` text ids, then `draw` tokens; the state carries on.

    state: the model's recurrent state for B streams; last: the logits (B, V) for the next token.
    While `draw` runs, they may live in buffers it writes again two tokens later: copy them to keep
    them longer.
    """

    def __init__(self, model: LanguageModel, precision: str = "fp32"):
        model.eval()
        self.model = model
        self.stepper = Stepper(model, precision)
        self.device = model.decoder.weight.device
        self.state = model.init_state(1)
        self.last: Tensor | None = None

    @torch.no_grad()
    def feed(self, ids: list[int]) -> None:
        """Run `ids` through the model as one sequence (every stream gets the same ids)."""
        if not ids:
            return
        streams = self.state[0][0].size(0)
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.device).unsqueeze(1).expand(-1, streams)
        logits, self.state = self.model(tokens, self.state)
        self.last = logits[-1].float()

    def expand(self, streams: int) -> None:
        """Copy a one-stream state into `streams` independent ones."""
        self.state = [tuple(s.expand(streams, -1).contiguous() for s in layer) for layer in self.state]
        self.last = self.last.expand(streams, -1)

    def branch(self, streams: int) -> Sampler:
        """A sampler of `streams` streams, each starting from this one-stream sampler's state; it
        shares the prepared stepper, so draw from one of them at a time. This one is unchanged."""
        other = copy.copy(self)
        other.expand(streams)
        return other

    @torch.no_grad()
    def draw(self, settings: SampleSettings, random: StreamRandom | None = None) -> Iterator[Tensor]:
        """Yield the next token of every stream, (B,) int64 on the CPU, up to `settings.max_tokens`
        times, drawn with its temperature, top_k and top_p; each drawn token is fed back, so stopping
        early leaves the state after the last one. `random` (one generator per stream) is needed
        unless the temperature is 0 (greedy)."""
        max_tokens, temperature, top_k, top_p = settings.max_tokens, settings.temperature, settings.top_k, settings.top_p
        whole = temperature > 0 and not 0 < top_k < self.last.size(-1) and top_p >= 1.0 and self.stepper.can_draw()
        if whole:  # the draw and the step in one op, writing to two sets of buffers in turn
            streams = self.last.size(0)
            buffers = [self.stepper.new_outputs(streams), self.stepper.new_outputs(streams)]
        for n in range(max_tokens):
            uniforms = random.next().to(self.device) if temperature else None
            if whole:
                token, self.last, self.state = self.stepper.draw(self.last, uniforms, temperature, self.state, buffers[n % 2])
            else:
                token = pick(self.last, temperature, top_k, top_p, uniforms)
                self.last, self.state = self.stepper.step(token, self.state)
            yield token.cpu()


def sample(model: LanguageModel, prompt_ids: list[int], settings: SampleSettings) -> Iterator[Tensor]:
    """Yield the next token of every sample, (settings.num_samples,) int64 on the CPU, up to
    `settings.max_tokens` times (its stops are the caller's: lmtrain.generation.samples).

    The context is `<eos>` (the start of a text) followed by `prompt_ids`; it runs through the
    model once as one sequence, and its final state is shared by all samples. Sample i draws
    from a generator seeded `seed + i`. precision: the stepper's weights (lmtrain.generation.stepper).
    """
    sampler = Sampler(model, settings.precision)
    sampler.feed([EOS_ID] + prompt_ids)
    sampler.expand(settings.num_samples)
    yield from sampler.draw(settings, StreamRandom(settings.seed, settings.num_samples))


def first_stop(text: str, stops: list[str]) -> str:
    """`text` up to (not including) the earliest of the `stops` it holds."""
    ends = [at for at in (text.find(s) for s in stops if s) if at >= 0]
    return text[: min(ends)] if ends else text


def pick(logits: Tensor, temperature: float, top_k: int, top_p: float, uniforms: Tensor | None) -> Tensor:
    """Draw one token per row of logits (B, V) -> (B,), row b by its uniform number uniforms[b]
    in [0, 1): the first token whose cumulative probability exceeds it. Temperature 0 means
    greedy (argmax), and needs no uniforms."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if step_ops.ops_for(logits.device) is not None and not 0 < top_k < logits.size(-1) and top_p >= 1.0:
        return step_ops.sample_rows(logits.float(), uniforms.float(), temperature)  # the same draw in one compiled pass
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
    cumulative = logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V); a token of probability 0 adds no width
    threshold = uniforms.view(-1, 1).to(cumulative.dtype) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, threshold, right=True).clamp_(max=logits.size(-1) - 1).squeeze(1)
