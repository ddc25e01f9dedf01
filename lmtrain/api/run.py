"""Training and evaluating from Python: `lmtrain.train(...)` -> TrainedRun, `lmtrain.evaluate(...)`
-> the report `lmtrain evaluate --json` prints. Both call the stage functions the CLI calls
(lmtrain.training.prepare_run and train, lmtrain.evaluation.evaluate_run), in this process, quiet
unless asked; a problem is an LmtrainError, never an exit."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain import runs
from lmtrain.api.model import TrainedModel, load, warn
from lmtrain.config import Config, SECTIONS, given_keys, load_config, toml_value
from lmtrain.errors import LmtrainError, require
from lmtrain.evaluation import CacheSettings, DynamicSettings, EvaluateSettings, evaluate_run
from lmtrain.progress import QuietProgress, TerminalProgress
from lmtrain.text import ENCODING_ERRORS
from lmtrain.training import default_run_dir, finetune_config, prepare_run, train as train_model

PathLike = str | os.PathLike


@dataclass
class TrainedRun:
    """A finished `lmtrain.train`: its run directory, its resolved config and the last record
    of metrics.jsonl (the last epoch's, or the stop's at train.max_steps: valid_ppl, step, ...)."""
    run_dir: Path
    config: Config
    record: dict[str, Any]

    @property
    def valid_ppl(self) -> float:
        return self.record["valid_ppl"]

    @property
    def init_from(self) -> dict[str, Any] | None:
        """Where a fine-tuned run came from (RUN, its checkpoint and step, the <unk> share), else None."""
        return runs.read_marker(self.run_dir).get("init_from")

    def load(self, *, device: str | torch.device = "auto") -> TrainedModel:
        """The run's best model (best.pt)."""
        return load(self.run_dir, device=device)


class RecordProgress(QuietProgress):
    """Progress for a callback: `on_record(record)` after each validation (an epoch's end, or the
    stop at train.max_steps), with the record metrics.jsonl gets."""

    def __init__(self, on_record: Callable[[dict], None]):
        self.on_record = on_record

    def end_epoch(self, record: dict) -> None:
        self.on_record(record)


def progress_for(progress: bool | QuietProgress | Callable[[dict], None]) -> tuple[QuietProgress, Callable[[str], None]]:
    """(the loop's progress, where lines of news go): True is the CLI's bars and lines on stderr;
    False nothing; a QuietProgress (lmtrain.progress) is used as it is; a callable gets each validation's record."""
    if progress is True:
        return TerminalProgress(), lambda line: print(line, file=sys.stderr)
    if progress is False or progress is None:
        return QuietProgress(), lambda line: warn(line) if line.startswith("warning:") else None
    if isinstance(progress, QuietProgress):
        return progress, progress.note
    if callable(progress):
        return RecordProgress(progress), lambda line: None
    raise LmtrainError(f"progress must be True, False, a callable or an lmtrain.progress.QuietProgress, got {progress!r}")


def override_items(overrides: Mapping[str, Any] | Iterable[str] | None) -> list[str]:
    """{"train.max_steps": 100} (or ["train.max_steps=100"], as --set takes them) -> --set items."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise LmtrainError(f"overrides must be a dict of 'section.key': value, got the str {overrides!r}")
    if not isinstance(overrides, Mapping):
        return [str(item) for item in overrides]
    items = []
    for name, value in overrides.items():
        section, dot, key = str(name).partition(".")
        if not dot or section not in SECTIONS:
            raise LmtrainError(f"override keys are section.key with a section of {', '.join(SECTIONS)}, got '{name}'")
        items.append(f"{name}={value if isinstance(value, str) else toml_value(value)}")
    return items


def optional_path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value)


def train(corpus: PathLike | None = None, *, config: PathLike | None = None,
          overrides: Mapping[str, Any] | Iterable[str] | None = None, run_dir: PathLike | None = None,
          init_from: PathLike | None = None, force: bool = False,
          progress: bool | QuietProgress | Callable[[dict], None] = False,
          encoding_errors: str = "strict") -> TrainedRun:
    """`lmtrain train CORPUS --config CONFIG --set ... --run-dir RUN_DIR [--init-from RUN]`, in
    this process: the same run directory, metrics.jsonl and checkpoints.

    corpus: a directory with train.txt/valid.txt/test.txt, or one text file (None: the built-in
    corpus). config: a TOML file; overrides: {"section.key": value}, applied after it. run_dir
    None: runs/<corpus>-<time>. init_from: fine-tune RUN (its weights, tokenizer and config; see
    lmtrain.training.finetune). progress: False (quiet), True (the CLI's bars on stderr), a
    callable given each validation's record (RecordProgress), or an lmtrain.progress.QuietProgress.
    One process (no torchrun); Ctrl-C raises KeyboardInterrupt, the last checkpoint written intact
    (continue with `lmtrain train --resume RUN_DIR`).
    """
    started = time.perf_counter()  # train.max_minutes counts from here
    require((encoding_errors in ENCODING_ERRORS, f"encoding_errors must be {' or '.join(ENCODING_ERRORS)}, got {encoding_errors!r}"))
    loop_progress, say = progress_for(progress)
    items = override_items(overrides)
    start = None
    with ExitStack() as hold:  # the run directory's lock, until training ends
        if init_from is not None:
            cfg, saved = finetune_config(Path(init_from), optional_path(config), items, warn)
            start = (Path(init_from), saved)
        else:
            cfg = load_config(optional_path(config), items)
        model, cfg, data, info = prepare_run(optional_path(corpus), cfg, optional_path(run_dir), force=force,
                                             default_run_dir=default_run_dir, say=say, encoding_errors=encoding_errors,
                                             progress=loop_progress, hold=hold, init_from=start,
                                             given=given_keys(optional_path(config), items), started=started)
        where = Path(info.pop("run_dir"))
        record = train_model(model, cfg, data, where, info, progress=loop_progress, started=started)
    return TrainedRun(where, cfg, record)


def evaluate(run: PathLike | TrainedRun | TrainedModel, files: Iterable[PathLike] | None = None, *,
             split: str = "test", batch_size: int | None = None, dynamic: bool | DynamicSettings = False,
             cache: bool | CacheSettings = False, tune_cache: bool = False,
             encoding_errors: str = "strict") -> dict[str, Any]:
    """`lmtrain evaluate RUN [FILES] --json`: the same report (tokens, nll, ppl, word_ppl,
    bits_per_byte, ..., and "files" or "split"). `run`: a run directory or checkpoint, or what
    `train` or `load` returned. dynamic / cache: True for the defaults, or their settings
    (lmtrain.evaluation.DynamicSettings, CacheSettings); both score one stream."""
    if isinstance(run, TrainedRun):
        run = run.run_dir
    elif isinstance(run, TrainedModel):
        run = run.path
    require(
        (split in ("train", "valid", "test"), f"split must be train, valid or test, got {split!r}"),
        (batch_size is None or (isinstance(batch_size, int) and batch_size >= 1), f"batch_size must be at least 1, got {batch_size!r}"),
        (not ((dynamic or cache or tune_cache) and batch_size not in (None, 1)), "dynamic evaluation and the cache score one stream: batch_size must be 1"),
        (encoding_errors in ENCODING_ERRORS, f"encoding_errors must be {' or '.join(ENCODING_ERRORS)}, got {encoding_errors!r}"),
    )
    cache = cache or tune_cache
    settings = EvaluateSettings(
        split=split, batch_size=batch_size,
        dynamic=(dynamic if isinstance(dynamic, DynamicSettings) else DynamicSettings()) if dynamic else None,
        cache=(cache if isinstance(cache, CacheSettings) else CacheSettings()) if cache else None,
        tune_cache=tune_cache, encoding_errors=encoding_errors,
    )
    paths = [Path(f) for f in files] if files is not None else None
    return evaluate_run(Path(run), paths or None, settings, warn).report
