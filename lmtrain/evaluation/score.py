"""The log-probabilities of lines and texts, for rescoring and filtering (`lmtrain score`, the
Python API's `score`): each scored from a fresh state, many side by side, or as one document in
order, the state carried from line to line.

    lines ─ encoded a batch at a time ─▶ ids of each line, <eos> last
      fresh:  B lines side by side, padded      inputs  s a b c     s x y .     targets  a b c s   x y s -1
              (one stream each, zero state)                                       (s = <eos>, -1 not scored)
      carry:  the lines one after another in one stream, the state carried on
          ─▶ log p(token | what came before it), float64 nats ─▶ one Scored per line

Every line's first token is predicted from <eos> (what evaluation feeds before a text's first
token, lmtrain.text.batchify), and its last target is its <eos>. So a line scored fresh is what
`lmtrain evaluate FILE --batch-size 1` gives for a FILE of that one line, and the lines of a file
scored with `carry_state` are that command on the whole file: the same stream, cut into windows at
other places, which in eval mode changes nothing but the rounding.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmtrain.evaluation.run import evaluation_stream_bytes
from lmtrain.evaluation.stream import window_log_probs
from lmtrain.memory import require_fits
from lmtrain.model import LanguageModel, State
from lmtrain.text import EOS_ID, Tokenizer, encode_in_memory, text_lines, windows

BATCH_LINES = 32  # lines scored side by side (fresh) or encoded at once (carry)


@dataclass(frozen=True)
class Scored:
    """One line (or text): its ids, <eos> last, and the natural log-probability of each."""
    text: str
    ids: np.ndarray  # (tokens,) int64
    log_probs: np.ndarray  # (tokens,) float64

    def __repr__(self) -> str:
        return f"Scored(text={self.text!r}, tokens={self.tokens}, log_prob={self.log_prob:.4f}, ppl={self.ppl:.3f})"

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def log_prob(self) -> float:
        """The total: log p(text) in nats."""
        return float(self.log_probs.sum())

    @property
    def ppl(self) -> float:
        return math.exp(-self.log_prob / self.tokens)


@torch.no_grad()
def sequence_log_probs(model: LanguageModel, sequences: list[np.ndarray], bptt: int,
                       state: State | None = None) -> tuple[list[np.ndarray], State]:
    """log p of every id of each sequence, the sequences side by side as streams (B = their
    number), each one's first id predicted from <eos>; `state`: the streams' state to start from
    (None: zero). Returns the log-probs per sequence, (len,) float64, and the state after the
    last window (only meaningful for streams with no padding: one sequence, or equal lengths)."""
    lengths = [len(s) for s in sequences]
    steps, streams = max(lengths), len(sequences)
    inputs = torch.zeros(steps, streams, dtype=torch.int64)
    targets = torch.full((steps, streams), -1, dtype=torch.int64)
    for b, ids in enumerate(sequences):
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        targets[: len(ids), b] = ids
        inputs[0, b] = EOS_ID
        inputs[1 : len(ids), b] = ids[:-1]
    was_training = model.training
    model.eval()
    device = model.decoder.weight.device
    state = model.init_state(streams) if state is None else state
    picked = []
    for x, y in windows(inputs.to(device), targets.to(device), bptt):
        window, _, state = window_log_probs(model, x, y, state)
        picked.append(window.double())
    model.train(was_training)
    log_probs = torch.cat(picked).cpu().numpy()  # (steps, streams)
    return [log_probs[:n, b].copy() for b, n in enumerate(lengths)], state


def line_ids(tokenizer: Tokenizer, lines: list[str]) -> list[np.ndarray]:
    """Each line's ids, <eos> last, from one encoding of all of them (a long line's pieces, which
    end without <eos>, stay with their line)."""
    ids = encode_in_memory(tokenizer, lines).tokens.astype(np.int64)
    ends = np.flatnonzero(ids == EOS_ID) + 1
    per_line = np.split(ids, ends[:-1])
    assert len(per_line) == len(lines)
    return per_line


def check_batch_fits(model: LanguageModel, streams: int, bptt: int) -> None:
    require_fits(streams * evaluation_stream_bytes(model, bptt), f"scoring {streams:,} lines at once (--batch-size)",
                 "give a smaller --batch-size", model.decoder.weight.device)


def score_lines(model: LanguageModel, tokenizer: Tokenizer, lines: Iterable[str], *, bptt: int,
                batch_lines: int = BATCH_LINES, carry_state: bool = False) -> Iterator[Scored]:
    """A Scored per line of `lines`, in order, as they come: `batch_lines` at a time are read,
    encoded and scored (side by side from a fresh state each, or with `carry_state` one after
    another in one stream), so an endless pipe is scored in bounded memory."""
    check_batch_fits(model, 1 if carry_state else batch_lines, bptt)
    state = None
    stream = iter(lines)
    while batch := list(itertools.islice(stream, batch_lines)):
        ids = line_ids(tokenizer, batch)
        if carry_state:
            [joined], state = sequence_log_probs(model, [np.concatenate(ids)], bptt, state)
            log_probs = np.split(joined, np.cumsum([len(i) for i in ids])[:-1])
        else:
            log_probs, _ = sequence_log_probs(model, ids, bptt)
        yield from (Scored(line, i, lp) for line, i, lp in zip(batch, ids, log_probs))


def score_texts(model: LanguageModel, tokenizer: Tokenizer, texts: Iterable[str], *, bptt: int,
                batch_texts: int = BATCH_LINES) -> list[Scored]:
    """A Scored per text, each from a fresh state, `batch_texts` side by side. A text may hold
    several lines: each ends with <eos>, as in a file of it (lmtrain.text.text_lines)."""
    check_batch_fits(model, batch_texts, bptt)
    scored: list[Scored] = []
    stream = iter(texts)
    while batch := list(itertools.islice(stream, batch_texts)):
        ids = [encode_in_memory(tokenizer, text_lines(text) or [""]).tokens.astype(np.int64) for text in batch]
        log_probs, _ = sequence_log_probs(model, ids, bptt)
        scored += [Scored(text, i, lp) for text, i, lp in zip(batch, ids, log_probs)]
    return scored
