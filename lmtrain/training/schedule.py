"""Learning rates: the only place a rate is computed.

    epoch_lr      an epoch's base rate, at its start (train.lr_schedule epoch: decayed by
                  train.lr_decay each epoch from train.lr_decay_start; plateau: as the last
                  validation left it; cosine and constant: train.lr)
    plateau_lr    the plateau schedule's base rate after a validation (divided by train.lr_decay
                  when it did not improve)
    lr            one optimizer step's rate: the epoch's base (or the cosine from train.lr over the
                  run's steps), times the linear warm-up, scaled by the window's length with
                  variable BPTT

A new schedule is a branch here and its name in lmtrain.config.LR_SCHEDULES."""

from __future__ import annotations

import math

from lmtrain.config import TrainConfig


def epoch_lr(config: TrainConfig, epoch: int, plateau_lr: float) -> float:
    """The learning rate of `epoch` (1-based) under the epoch, plateau or constant schedule."""
    if config.lr_schedule == "epoch":
        return config.lr / config.lr_decay ** max(0, epoch - config.lr_decay_start)
    if config.lr_schedule == "plateau":
        return plateau_lr
    return config.lr


def step_lr(config: TrainConfig, base_lr: float, step: int, total_steps: int) -> float:
    """The lr of optimizer step `step` (0-based): the epoch's `base_lr`, or the cosine from
    config.lr, times the linear warm-up over the first config.warmup_steps steps."""
    lr = base_lr
    if config.lr_schedule == "cosine":
        lr = 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    if step < config.warmup_steps:
        lr *= (step + 1) / config.warmup_steps
    return lr


def plateau_lr(config: TrainConfig, rate: float, improved: bool) -> float:
    """The base rate after an epoch's validation: the plateau schedule divides it by
    train.lr_decay when validation did not improve on the best so far; others leave it."""
    if not improved and config.lr_schedule == "plateau":
        return rate / config.lr_decay
    return rate


def lr(config: TrainConfig, base_lr: float, step: int, total_steps: int, length: int) -> float:
    """The rate of optimizer step `step` (0-based) over a window of `length` time steps: `step_lr`,
    scaled by length / bptt under variable BPTT (AWD-LSTM: a shorter window takes a smaller step)."""
    return step_lr(config, base_lr, step, total_steps) * (length / config.bptt if config.variable_bptt else 1.0)
