"""When training ends, and the clock it ends by: train.epochs, train.max_steps and train.max_minutes."""

from __future__ import annotations

import math
import time

from lmtrain.config import TrainConfig
from lmtrain.training import distributed
from lmtrain.training.resume import LoopState


def plan(config: TrainConfig, rows: int) -> tuple[int, int]:
    """(epochs, total steps) of a run over `rows` rows of streams: train.epochs, capped by
    train.max_steps when that is set (it also sets the length of the cosine schedule)."""
    steps_per_epoch = math.ceil(rows / config.bptt)
    epochs = config.epochs if config.epochs else math.ceil(config.max_steps / steps_per_epoch)
    if config.max_steps:
        epochs = min(epochs, math.ceil(config.max_steps / steps_per_epoch))
    return epochs, config.max_steps or epochs * steps_per_epoch


def finished(config: TrainConfig, s: LoopState, epochs: int, elapsed_s: float) -> str | None:
    """Why training ends before its next step, or None: the step limit, the last epoch done, or
    train.max_minutes spent (mid-epoch too: lmtrain.training.loop validates and checkpoints there)."""
    if config.max_steps and s.step >= config.max_steps:
        return f"its train.max_steps = {config.max_steps:,} steps are done"
    if s.lengths is None and s.epoch > epochs:
        return f"its {epochs} epoch(s) are done"
    if config.max_minutes and distributed.any_rank(out_of_time(config, elapsed_s)):
        return f"its train.max_minutes = {config.max_minutes:g} are spent"
    return None


class Clock:
    """A run's seconds: those of the processes before this one (from the checkpoint) plus this
    one's since `started` (time.perf_counter() at the command's start, so that reading the corpus,
    the one-time C++ build and the model's sizing count against train.max_minutes; None: now)."""

    def __init__(self, before_s: float, started: float | None = None):
        self.before_s = before_s
        self.started = time.perf_counter() if started is None else started

    def __call__(self) -> float:
        return self.before_s + time.perf_counter() - self.started


def steps_left(config: TrainConfig, s: LoopState) -> int:
    """Steps this epoch still has, within train.max_steps (for the progress bar)."""
    left = len(s.lengths) - s.window
    return min(left, config.max_steps - s.step) if config.max_steps else left


def out_of_time(config: TrainConfig, elapsed_s: float) -> bool:
    """Whether `elapsed_s` seconds of the run have spent config.max_minutes (0: no budget)."""
    return bool(config.max_minutes) and elapsed_s >= 60 * config.max_minutes
