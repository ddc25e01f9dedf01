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
    (between epochs) no time left for another epoch."""
    if config.max_steps and s.step >= config.max_steps:
        return f"its train.max_steps = {config.max_steps:,} steps are done"
    if s.lengths is None and s.epoch > epochs:
        return f"its {epochs} epoch(s) are done"
    if s.lengths is None and s.epoch > 1 and distributed.any_rank(out_of_time(config, elapsed_s, s.epoch_seconds)):
        return f"another epoch would end past train.max_minutes = {config.max_minutes:g}"
    return None


class Clock:
    """Training seconds: those of the runs before this one (from the checkpoint) plus this one's."""

    def __init__(self, before_s: float):
        self.before_s = before_s
        self.started = time.perf_counter()

    def __call__(self) -> float:
        return self.before_s + time.perf_counter() - self.started


def steps_left(config: TrainConfig, s: LoopState) -> int:
    """Steps this epoch still has, within train.max_steps (for the progress bar)."""
    left = len(s.lengths) - s.window
    return min(left, config.max_steps - s.step) if config.max_steps else left


def out_of_time(config: TrainConfig, elapsed_s: float, epoch_s: float) -> bool:
    """Whether another epoch as long as the last would end past config.max_minutes."""
    return bool(config.max_minutes) and elapsed_s + epoch_s > 60 * config.max_minutes
