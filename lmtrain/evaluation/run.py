"""`lmtrain evaluate` as a function: a saved run and some texts -> perplexities, without typer.

    evaluate_run(run, files, settings, warn) -> Evaluation
      load_run(run) -> the texts (FILES, or a split of the run's own corpus) -> for --dynamic the
      training split's gradient statistics, for --tune-cache a grid on the validation split ->
      each text encoded and scored (batched, or as one stream with the dynamic update and/or the
      cache) -> metrics per text and all texts combined (lmtrain.evaluation.evaluate.metrics,
      the one place derived metrics are computed)

The CLI checks the options, calls this once and prints what it returns.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtrain.errors import LmtrainError
from lmtrain.evaluation.dynamic import DynamicEval, DynamicSettings, gradient_stats
from lmtrain.evaluation.evaluate import CacheSettings, combine, evaluate, evaluate_stream, tune_cache
from lmtrain.memory import require_fits
from lmtrain.model import LanguageModel, attention, load_run
from lmtrain.runtime import resolve_device
from lmtrain.text import BUILTIN, Text, copy_stream, encode_split, load_corpus, load_text

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class EvaluateSettings:
    """How to score: `split` of the run's corpus when no files are given; `batch_size` streams
    (None: the run's train.eval_batch_size); `dynamic` and `cache` score one stream; `tune_cache`
    chooses the cache's theta and lambda on the validation split (its window from `cache`)."""
    split: str = "test"
    batch_size: int | None = None
    dynamic: DynamicSettings | None = None
    cache: CacheSettings | None = None
    tune_cache: bool = False
    encoding_errors: str = "strict"

    @property
    def one_stream(self) -> bool:
        return self.dynamic is not None or self.cache is not None


@dataclass
class Evaluation:
    """Metrics per scored text (by name), the report (all texts combined, the settings used, and
    "files" or "split") that --json prints, and the settings used by name ("dynamic", "cache")."""
    results: dict[str, dict[str, Any]]
    report: dict[str, Any]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


def evaluate_run(run: Path, files: list[Path] | None, settings: EvaluateSettings,
                 warn: Callable[[str], None]) -> Evaluation:
    """Score `files` (or `settings.split` of the run's corpus) with the model saved in `run`.
    Pipes among `files` are read once, into temporary files removed before returning."""
    with ExitStack() as copies:
        loaded = load_run(run, resolve_device("auto"), warn)
        batch = settings.batch_size or loaded.config.train.eval_batch_size
        bptt = loaded.config.train.bptt
        if not settings.one_stream:
            require_fits(batch * evaluation_stream_bytes(loaded.model, bptt), f"scoring {batch:,} streams at once (--batch-size)",
                         "give a smaller --batch-size", loaded.model.decoder.weight.device)

        def split_text(split: str) -> Text:
            return corpus_split(loaded.corpus, split, warn, settings.encoding_errors, loaded.corpus_digests)

        if files:
            texts = {str(f): text_to_score(f, settings.encoding_errors, copies) for f in files}
        else:
            texts = {settings.split: split_text(settings.split)}
        used: dict[str, dict[str, Any]] = {}
        adapt = None
        if settings.dynamic is not None:
            train_tokens = encode_split(loaded.tokenizer, split_text("train")).tokens
            adapt = DynamicEval(loaded.model, gradient_stats(loaded.model, train_tokens, settings.dynamic), settings.dynamic)
            bptt = settings.dynamic.bptt
            used["dynamic"] = dataclasses.asdict(settings.dynamic)
        cache = settings.cache
        if settings.tune_cache:
            valid = encode_split(loaded.tokenizer, split_text("valid"))
            cache = tune_cache(loaded.model, valid, bptt, cache.window)
        if cache is not None:
            used["cache"] = dataclasses.asdict(cache)
        results = {}
        for name, text in texts.items():
            tokens = encode_split(loaded.tokenizer, text)
            if len(tokens.tokens) == 0:  # the corpus checks refuse an empty text; this is the last guard
                raise LmtrainError(f"{name} holds no text to score")
            if settings.batch_size is not None and settings.batch_size > len(tokens.tokens):
                raise LmtrainError(f"--batch-size {settings.batch_size:,} is more than the {len(tokens.tokens):,} tokens of "
                                   f"{name}: streams would hold no text; give at most {len(tokens.tokens):,}")
            if settings.one_stream:
                results[name] = evaluate_stream(loaded.model, tokens, bptt, adapt, cache)
            else:
                results[name] = evaluate(loaded.model, tokens, batch, bptt)
    report = dict(combine(list(results.values())))
    report.update(used)
    if files:
        report["files"] = [{"file": name, **m} for name, m in results.items()]
    else:
        report["split"] = settings.split
    return Evaluation(results, report, used)


def text_to_score(path: Path, encoding_errors: str, copies: ExitStack) -> Text:
    """A file to evaluate, checked. One that can be read only once (a pipe, a FIFO, /dev/stdin,
    `<(...)`) is first copied into a temporary file, which `copies` removes; messages name `path`."""
    if not path.exists():
        raise LmtrainError(f"file to evaluate not found: {path}")
    if path.is_file() or path.is_dir():
        return load_text(path, encoding_errors)
    copy = copies.enter_context(tempfile.NamedTemporaryFile(prefix="lmtrain-", suffix=".txt"))
    copy_stream(path, copy)
    try:
        text = load_text(Path(copy.name), encoding_errors)
    except LmtrainError as e:
        raise LmtrainError(str(e).replace(copy.name, str(path))) from None
    return dataclasses.replace(text, name=str(path))


def evaluation_stream_bytes(model: LanguageModel, bptt: int) -> int:
    """A rough upper bound of one evaluation stream's memory: a window's logits and their
    log-softmax, the layers' activations and gates, the attention's band, the state."""
    hidden = sum(layer.hidden_size for layer in model.layers)
    a = model.attention
    band, memory = (0, 0) if a is None else (attention.position_units(a.hidden_size, a.window),
                                             sum(attention.state_widths(a.hidden_size, a.window).values()))
    return 4 * bptt * (3 * model.vocab_size + 8 * hidden + band) + 4 * 4 * (hidden + memory)


def corpus_split(source: str, split: str, warn: Callable[[str], None], encoding_errors: str = "strict",
                 recorded: dict[str, str] | None = None) -> Text:
    """A split of the run's training corpus; with `recorded` (the checkpoint's corpus_digests), a
    warning when its text is not the one the model was trained with (still scored)."""
    if source != BUILTIN and not Path(source).exists():
        raise LmtrainError(f"the run's training corpus {source} is no longer there; pass text files to score instead")
    text = load_corpus(None if source == BUILTIN else Path(source), encoding_errors).splits[split]
    if recorded is not None and recorded.get(split, text.digest) != text.digest:
        warn(f"warning: the {split} split of {source} is not the text this model was trained with: the corpus has "
             "changed since (a one-file corpus that grew moves its splits onto other lines); scoring it anyway")
    return text
