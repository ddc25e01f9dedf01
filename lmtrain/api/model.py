"""A trained model in Python: `lmtrain.load(path)` -> TrainedModel, with perplexity, score and
generate computed by the same stage functions as `lmtrain evaluate`, `lmtrain score` and
`lmtrain generate`, so the numbers and the text are the CLI's."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from lmtrain.config import Config
from lmtrain.errors import LmtrainError, require
from lmtrain.evaluation import Scored, evaluate, score_texts
from lmtrain.generation import SampleSettings, check_seed, draw_samples, resolve_precision
from lmtrain.model import LanguageModel, load_run
from lmtrain.runtime import resolve_device
from lmtrain.text import Tokenizer, encode_in_memory, text_lines


class LmtrainWarning(UserWarning):
    """What the CLI prints as `warning: ...` (a damaged checkpoint replaced by the one before it)."""


def warn(message: str) -> None:
    warnings.warn(message.removeprefix("warning: "), LmtrainWarning, stacklevel=3)


def device_for(device: str | torch.device) -> torch.device:
    """"auto" (CUDA where torch sees a GPU, else the CPU), "cpu", "cuda", "cuda:1" or a torch.device."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise LmtrainError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}")
    try:
        return resolve_device(device)
    except RuntimeError:
        raise LmtrainError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


class TrainedModel:
    """A trained model, its tokenizer and its config, ready to score and sample.

    `model` is the torch module (lmtrain.model.LanguageModel, in eval mode), `tokenizer` the
    sentencepiece wrapper (`encode_lines`, `encode_prompt`, `decode`), `config` the run's resolved
    lmtrain.config.Config, `path` the checkpoint the weights came from, `device` where they are.
    """

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, config: Config, *, path: Path | None,
                 progress: dict[str, Any], corpus: str):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.path = path
        self.progress = progress  # the training progress the checkpoint recorded (epoch, step, ...)
        self.corpus = corpus  # the training corpus' source: an absolute path or "builtin"

    @property
    def device(self) -> torch.device:
        return self.model.decoder.weight.device

    def __repr__(self) -> str:
        m = self.config.model
        return (f"TrainedModel({self.path}, {m.cell} x {m.layers}, vocab {self.tokenizer.vocab_size:,} "
                f"{self.tokenizer.kind}, on {self.device})")

    def metrics(self, text: str, *, batch_size: int = 1) -> dict[str, Any]:
        """Every metric `lmtrain evaluate FILE --batch-size N --json` gives for a FILE holding
        `text` (tokens, nll, ppl, word_ppl, bits_per_byte, ...). batch_size 1 (the default) gives
        every token its whole left context."""
        require((isinstance(text, str), f"text must be a str, got {type(text).__name__}"),
                (isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be at least 1, got {batch_size!r}"))
        tokens = encode_in_memory(self.tokenizer, text_lines(text))
        require((len(tokens.tokens) > 0, "nothing to score: the text is empty"),
                (batch_size <= len(tokens.tokens), f"batch_size {batch_size:,} is more than the text's "
                                                   f"{len(tokens.tokens):,} tokens"))
        return evaluate(self.model, tokens, batch_size, self.config.train.bptt)

    def perplexity(self, text: str, *, batch_size: int = 1) -> float:
        """Per-token perplexity of `text` (its line ends included), as `lmtrain evaluate` gives it."""
        return self.metrics(text, batch_size=batch_size)["ppl"]

    def score(self, texts: str | Iterable[str], *, batch_size: int = 32) -> list[Scored]:
        """Each text's log-probability, from a fresh state (`lmtrain score --per line` for a text
        of one line): a Scored with .log_prob (total, nats), .tokens (its line end included),
        .ppl, .ids and .log_probs (per token). A single str is one text. `batch_size` texts are
        scored side by side."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        require((bad is None, f"texts must be strs, got a {type(bad).__name__}"),
                (isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be at least 1, got {batch_size!r}"))
        return score_texts(self.model, self.tokenizer, texts, bptt=self.config.train.bptt, batch_texts=batch_size)

    def generate(self, prompt: str = "", *, max_tokens: int = 100, seed: int | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop: str | Iterable[str] = (), until_eos: bool = False,
                 precision: str = "auto", stream: bool = False) -> str | Iterator[str]:
        """The continuation of `prompt` (without the prompt), as `lmtrain generate --prompt PROMPT`
        draws it: the same seed, settings and precision give the same text, and the CLI prints
        prompt + this + a line end. `stream=True` returns an iterator of the pieces as they are
        drawn. temperature 0 is greedy; `stop` ends the text before its first occurrence (not
        included), `until_eos` at its first line end; seed None draws one at random."""
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        require(
            (isinstance(prompt, str), f"prompt must be a str, got {type(prompt).__name__}"),
            (isinstance(max_tokens, int) and max_tokens >= 1, f"max_tokens must be at least 1, got {max_tokens!r}"),
            (temperature >= 0 and temperature != float("inf"), f"temperature must be a finite number >= 0, got {temperature!r}"),
            (isinstance(top_k, int) and top_k >= 0, f"top_k must not be negative, got {top_k!r}"),
            (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p!r}"),
            (all(isinstance(s, str) for s in stops), "stop must be a str or strs"),
        )
        if seed is not None:
            check_seed(seed, 1)
        seed = seed if seed is not None else int.from_bytes(os.urandom(6), "little")
        stops = tuple(s for s in (*stops, "\n" if until_eos else "") if s)
        settings = SampleSettings(max_tokens, 1, float(temperature), top_k, float(top_p), seed,
                                  resolve_precision(precision, self.device), stops)
        prompt_ids = self.tokenizer.encode_prompt(prompt) if prompt else []
        pieces = (text for _, text, _ in draw_samples(self.model, self.tokenizer, prompt_ids, settings) if text)
        return pieces if stream else "".join(pieces)


def load(path: str | os.PathLike, *, device: str | torch.device = "auto") -> TrainedModel:
    """A run directory (its best.pt, or the checkpoint that stands in for a damaged one) or a
    checkpoint file, checked and loaded onto `device` ("auto": the GPU where there is one)."""
    loaded = load_run(Path(path), device_for(device), warn)
    return TrainedModel(loaded.model, loaded.tokenizer, loaded.config, path=loaded.path, progress=loaded.progress,
                        corpus=loaded.corpus)
