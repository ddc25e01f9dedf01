"""The training loop: truncated BPTT over contiguous streams, clipping, lr schedules, NT-ASGD, checkpoints.

Per window: the model's last-layer output -> decoder -> cross-entropy (+ AR and TAR penalties)
-> backward through our recurrences -> gradient clipping -> optimizer step (-> weight average).

It knows nothing of the command line or the terminal: progress goes to a `progress` object
(see lmtrain.progress) and records to `metrics.jsonl` in the run directory, one JSON object per
line: {"kind": "train", ...} every `train.log_interval` steps, {"kind": "epoch", ...} after each
epoch's validation and {"kind": "stop", ...} when train.max_steps ends a run mid-epoch. Wall-clock
figures go to `timing.jsonl`, so that metrics.jsonl is the same file for the same config, seed
and machine (tests/test_determinism.py), and the same for a run stopped and resumed any number
of times (tests/test_resume.py): last.pt holds the whole state of the loop (lmtrain.training.resume).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import closing, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmtrain.atomic import open_regular
from lmtrain.config import Config, TrainConfig
from lmtrain.errors import LmtrainError
from lmtrain.evaluation import total_nll
from lmtrain.model import LanguageModel, build, cross_entropy, detach_state
from lmtrain.progress import QuietProgress
from lmtrain.text import EOS_ID, TokenFile, lazy_batchify
from lmtrain.training import distributed
from lmtrain.training.averaging import WeightAverage, nt_trigger
from lmtrain.training.graphs import WindowRunner, graphs_for
from lmtrain.training.resume import LoopState, data_digest
from lmtrain.training.saver import Saver, restore_loop
from lmtrain.training.schedule import epoch_lr, lr, plateau_lr
from lmtrain.training.tensorboard import MetricsLog
from lmtrain.training.stops import Clock, finished, plan, steps_left


def make_optimizer(model: LanguageModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD for sgd and ntasgd (whose averaging is `WeightAverage`, beside the optimizer)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def window_lengths(steps: int, config: TrainConfig, rng: np.random.Generator) -> list[int]:
    """The BPTT window lengths that cover `steps` rows: bptt each, or AWD-LSTM's variable lengths
    (base bptt with p 0.95 else bptt / 2, then N(base, 5), at least 5) drawn from `rng`."""
    if not config.variable_bptt:
        return [min(config.bptt, steps - start) for start in range(0, steps, config.bptt)]
    lengths, done = [], 0
    while done < steps:
        base = config.bptt if rng.random() < 0.95 else config.bptt / 2
        length = min(max(5, int(rng.normal(base, 5))), steps - done)
        lengths.append(length)
        done += length
    return lengths


def min_train_tokens(config: TrainConfig) -> int:
    """Tokens needed for one full batch: batch_size streams of bptt inputs."""
    return config.batch_size * config.bptt


def train(
    model: LanguageModel,
    config: Config,
    data: dict[str, TokenFile],
    run_dir: Path,
    checkpoint_info: dict[str, Any],
    *,
    progress=None,
    resume: dict[str, Any] | None = None,
    stop_requested: Callable[[], Any] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """Train `model` (already on its device) on data["train"], validating on data["valid"].

    Writes metrics.jsonl (losses and learning rates: the same bytes for the same config, seed and
    machine), timing.jsonl (tokens/s and elapsed seconds of the same records), best.pt whenever
    validation improves and last.pt at every epoch end and every train.checkpoint_every steps.
    `checkpoint_info` (corpus source, tokenizer) is stored in every checkpoint. `resume` is a
    checkpoint payload from last.pt (lmtrain.training.setup.resume_run) whose model weights are already in
    `model`: training continues exactly where it was.

    Training ends:
      - after the last epoch;
      - at train.max_steps, or once train.max_minutes are spent, counted from `started` (the
        command's time.perf_counter() at its start; None: now) plus the seconds of the processes
        before a resume. At an epoch's end that is an ordinary epoch end. Mid-epoch the partial
        epoch is validated and recorded as {"kind": "stop", ...} (an epoch record's fields), best.pt
        is written if that beats every epoch end so far, and last.pt holds the exact position.
        The stop's validation changes no schedule state (plateau lr, best, NT-ASGD's history), and
        resuming removes its record and undoes its best.pt (lmtrain.training.resume), so a run stopped at
        N steps and resumed to 2N writes the same metrics.jsonl as a run to 2N;
      - when `stop_requested()` returns something other than None (a signal: lmtrain.training.signals),
        after the current step: last.pt is written at the exact position, without validation,
        and {"kind": "interrupted", "epoch": ..., "step": ...} is returned;
      - with LmtrainError when more than train.max_bad_steps steps in a row have a non-finite
        loss or gradient norm (each is skipped: no update, counted as bad_steps in the records),
        or when the weights themselves are no longer finite at a checkpoint, which is then not
        written (the last good one stays).

    Under torchrun every rank runs this on its share of the streams, through DDP, and logs the
    losses summed over ranks; ranks take every decision (skip a step, stop) together, and only the
    main rank writes files (lmtrain.training.distributed). A resumed run continues in one process.

    Returns the last epoch (or stop) record, timing included, and run_s: the clock at the end.
    """
    tc = config.train
    progress = progress or QuietProgress()
    stop_requested = stop_requested or (lambda: None)
    device = model.decoder.weight.device
    compute_dtype = torch.bfloat16 if tc.precision == "bf16" else None
    # windows built from the memmap as they are used; under torchrun each rank trains on its share
    # of the streams (lmtrain.training.distributed)
    inputs, targets = distributed.shard_streams(*lazy_batchify(data["train"].tokens, tc.batch_size, EOS_ID))
    inputs, targets = inputs.to(device), targets.to(device)
    epochs, total_steps = plan(tc, inputs.size(0))
    optimizer = make_optimizer(model, tc)
    forward = distributed.training_forward(model, tc.seed)  # DDP under torchrun
    # each window's forward + backward, replayed as a CUDA graph where it can be (lmtrain.training.graphs)
    # off under DDP, decided alike on every rank: it depends on the config and the world size alone
    use_graphs, graphs_note = graphs_for(tc, device, distributed.world_size())
    if graphs_note:
        progress.note(graphs_note)
    run_window = WindowRunner(partial(train_window, forward, tc, compute_dtype), list(model.parameters()),
                              use_graphs, progress.note)
    window_rng = np.random.default_rng(tc.seed)  # window lengths
    if resume is not None and distributed.world_size() > 1:
        raise distributed.every_rank_error("--resume continues a run in one process: drop --nproc (or torchrun)")
    if resume is None:
        s, average, state = LoopState(lr=tc.lr), None, None
    else:
        s, average, state = restore_loop(resume, model, optimizer, window_rng, device)
    model.train()
    if device.type == "cpu":
        build.cpu_ops()  # the one-time C++ build (a minute or so), before the first window is timed
    clock = Clock(s.elapsed_s, started)
    record: dict[str, Any] = {}
    resumed_at = s.step if resume is not None else None
    first_step = s.step
    # the budget is checked once this process has taken a step: a setup that spent it all still
    # gives one step, validated and checkpointed (the CLI then says by how much the budget was passed)
    spent = lambda: clock() if s.step > first_step else 0.0  # noqa: E731
    with open_log(run_dir / "metrics.jsonl", tensorboard=config.train.tensorboard, resumed_at=resumed_at) as log, open_log(run_dir / "timing.jsonl") as timing, closing(progress):
        saver = Saver(run_dir, config, checkpoint_info, data_digest(data), model=model, optimizer=optimizer,
                      window_rng=window_rng, log=log, timing=timing)
        saved = resume is not None  # whether last.pt holds the state as it is now
        interval_start = time.perf_counter()
        if s.lengths is not None:
            progress.start_epoch(s.epoch, epochs, steps_left(tc, s))
        while True:
            if distributed.any_rank(stop_requested() is not None):
                if not saved:
                    saver.save(s, average, state, clock(), at="step")
                record = {"kind": "interrupted", "epoch": s.epoch, "step": s.step}
                break
            if s.lengths is None:  # between epochs
                reason = finished(tc, s, epochs, spent())
                if reason is not None:
                    break
                state = start_epoch(s, tc, model, rows=inputs.size(0), streams=inputs.size(1), window_rng=window_rng,
                                     elapsed_s=clock())
                progress.start_epoch(s.epoch, epochs, steps_left(tc, s))
                interval_start = time.perf_counter()
            if s.window == len(s.lengths):
                record, improved = end_epoch(s, tc, model, data["valid"], average=average, compute_dtype=compute_dtype,
                                             log=log, timing=timing, clock=clock, progress=progress)
                if tc.optimizer == "ntasgd" and average is None and nt_trigger(s.valid_history, tc.nonmono):
                    average = WeightAverage(model)
                    progress.note(f"epoch {record['epoch']}: validation has not improved for {tc.nonmono} checks; averaging the weights from here on (NT-ASGD)")
                saver.save(s, average, state, clock(), at="epoch", epoch=record["epoch"],
                           valid_nll=record["valid_loss"], best=improved)
                saved = True
                continue
            if finished(tc, s, epochs, spent()) is not None:  # the step limit or the budget, mid-epoch
                logs_at = saver.log_sizes()
                record = validate_and_record(s, tc, model, data["valid"], average=average, compute_dtype=compute_dtype,
                                             log=log, timing=timing, clock=clock, progress=progress, kind="stop")
                saver.save(s, average, state, clock(), at="stop", valid_nll=record["valid_loss"],
                           best=record["valid_loss"] < s.best_valid_nll, logs_at=logs_at)
                break
            length = s.lengths[s.window]
            x, y = inputs[s.position : s.position + length], targets[s.position : s.position + length]
            step_rate = lr(tc, s.lr, s.step, total_steps, length)
            for group in optimizer.param_groups:
                group["lr"] = step_rate
            loss_value, state = train_step(model, run_window, optimizer, tc, x, y, state=state)
            if loss_value is not None and average is not None:
                average.update()
            count_step(s, tc, loss_value, tokens=y.numel(), length=length, step_rate=step_rate, run_dir=run_dir)
            saved = False
            now = time.perf_counter()
            progress.step(math.nan if loss_value is None else loss_value,  # rank 0's loss, every rank's tokens
                          distributed.world_size() * s.epoch_tokens / max(1e-9, clock() - s.epoch_started_s), step_rate)
            if s.step % tc.log_interval == 0:
                loss_sum, tokens = distributed.sum_over_ranks(s.interval_loss, s.interval_tokens)
                write_record(log, timing, {"tokens_per_s": tokens / max(1e-9, now - interval_start),
                                           "elapsed_s": clock()},
                             kind="train", epoch=s.epoch, step=s.step, lr=step_rate,
                             loss=mean_or_none(loss_sum, tokens), ppl=ppl_or_none(loss_sum, tokens),
                             bad_steps=s.interval_bad)
                s.interval_loss = s.interval_tokens = 0.0
                s.interval_bad = 0
                interval_start = now
            if tc.checkpoint_every and s.step % tc.checkpoint_every == 0 and s.window < len(s.lengths):
                saver.save(s, average, state, clock(), at="step")
                saved = True
        hits = run_window.hit_note()
        if hits:
            progress.note(hits)
    return {**record, "run_s": clock()}  # run_s: the run's seconds at the end, its last checkpoint written


def start_epoch(s: LoopState, config: TrainConfig, model: LanguageModel, *, rows: int, streams: int,
                window_rng: np.random.Generator, elapsed_s: float):
    """Draw the epoch's windows over `rows` rows, set its lr, zero its sums; return the zero state of
    the `streams` streams it starts from."""
    s.lr = epoch_lr(config, s.epoch, s.lr)
    s.lengths = window_lengths(rows, config, window_rng)
    s.window = s.position = 0
    s.epoch_loss = s.epoch_tokens = s.interval_loss = s.interval_tokens = 0.0
    s.epoch_bad = s.interval_bad = 0
    s.epoch_started_s = elapsed_s
    model.train()
    return model.init_state(streams)


def train_step(model: LanguageModel, run_window, optimizer: torch.optim.Optimizer, config: TrainConfig, x: Tensor,
               y: Tensor, *, state) -> tuple[float | None, list]:
    """One window: x, y (T, B). Forward and backward (`run_window`: lmtrain.training.graphs.WindowRunner
    over `train_window`), clip, and the optimizer step when the loss and the gradient norm are
    finite. Returns the window's mean loss (None: the step was skipped) and the state to carry to
    the next window (zeros in place of a state that is not finite). Every rank runs backward
    (DDP's gradient averaging needs all of them) and the ranks decide together whether to step."""
    loss, state = run_window(x, y, detach_state(state))
    # one synchronisation per step (on CUDA) for both numbers the step decides on
    loss_value, norm = torch.stack([loss.detach().float(), gradient_norm(model, config.clip).float()]).tolist()
    good = math.isfinite(loss_value) and math.isfinite(norm)
    if not distributed.any_rank(not good):
        optimizer.step()
        return loss_value, state
    optimizer.zero_grad(set_to_none=True)
    if not all(torch.isfinite(t).all() for layer in state for t in layer):
        state = model.init_state(x.size(1))
    return None, state


def train_window(forward, config: TrainConfig, compute_dtype: torch.dtype | None,
                 x: Tensor, y: Tensor, state) -> tuple[Tensor, list]:
    """One window's forward and backward: x, y (T, B) -> (mean loss per token, new state); the
    gradients are left in the parameters' .grad. `forward` is the window's forward
    (lmtrain.training.distributed.training_forward: DDP under torchrun). AR and TAR join the objective,
    not the loss."""
    raw, dropped, logits, state = forward(x, state, compute_dtype)
    loss = cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).mean()
    objective = loss
    if config.ar:
        objective = objective + config.ar * dropped.pow(2).mean()
    if config.tar and raw.size(0) > 1:
        objective = objective + config.tar * (raw[1:] - raw[:-1]).pow(2).mean()
    (objective * x.size(0) if config.loss_reduction == "sequence_sum" else objective).backward()
    return loss, state


def gradient_norm(model: LanguageModel, clip: float) -> Tensor:
    """The global gradient norm (a 0-d tensor on the model's device), after clipping the gradients
    to `clip` when that is set (0: no clipping)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def count_step(s: LoopState, config: TrainConfig, loss_value: float | None, *, tokens: int, length: int,
               step_rate: float, run_dir: Path) -> None:
    """Advance the position and the sums by one step; a skipped step counts as bad, and too many
    in a row stop the run."""
    s.step += 1
    s.window += 1
    s.position += length
    s.last_rate = step_rate
    if loss_value is None:
        s.epoch_bad += 1
        s.interval_bad += 1
        s.bad_in_row += 1
        if s.bad_in_row > config.max_bad_steps:
            last = run_dir / "last.pt"
            raise LmtrainError(
                f"{s.bad_in_row} steps in a row up to step {s.step:,} had a non-finite loss or gradient norm, more "
                f"than train.max_bad_steps = {config.max_bad_steps}: stopping "
                + (f"({last} holds the last good checkpoint; " if last.is_file() else "(no checkpoint was written; ")
                + "a lower train.lr or a train.clip may help)"
            )
        return
    s.bad_in_row = 0
    s.epoch_loss += loss_value * tokens
    s.epoch_tokens += tokens
    s.interval_loss += loss_value * tokens
    s.interval_tokens += tokens


def mean_or_none(loss_sum: float, tokens: float) -> float | None:
    return loss_sum / tokens if tokens else None


def ppl_or_none(loss_sum: float, tokens: float) -> float | None:
    return math.exp(min(loss_sum / tokens, 50)) if tokens else None


def validate_and_record(s: LoopState, config: TrainConfig, model: LanguageModel, valid: TokenFile, *,
                        average: WeightAverage | None, compute_dtype, log, timing, clock: Clock, progress,
                        kind: str) -> dict[str, Any]:
    """Validate (with NT-ASGD's average once averaging) and write the `kind` record ("epoch" or "stop")."""
    train_seconds = clock() - s.epoch_started_s
    distributed.check_in_sync(model)
    epoch_loss, epoch_tokens = distributed.sum_over_ranks(s.epoch_loss, s.epoch_tokens)
    with average.swapped_in() if average is not None else nullcontext():  # each rank scores its share of the streams
        valid_nll_sum, valid_tokens = distributed.sum_over_ranks(*total_nll(
            model, valid.tokens, config.eval_batch_size, config.bptt, compute_dtype,
            distributed.stream_share(config.eval_batch_size)))
    valid_nll = valid_nll_sum / valid_tokens
    record = write_record(
        log, timing, {"tokens_per_s": epoch_tokens / max(1e-9, train_seconds), "elapsed_s": clock()},
        kind=kind, epoch=s.epoch, step=s.step, lr=s.last_rate, averaging=average is not None,
        train_loss=mean_or_none(epoch_loss, epoch_tokens), train_ppl=ppl_or_none(epoch_loss, epoch_tokens),
        valid_loss=valid_nll, valid_ppl=math.exp(min(valid_nll, 50)), bad_steps=s.epoch_bad,
    )
    progress.end_epoch(record)
    return record


def end_epoch(s: LoopState, config: TrainConfig, model: LanguageModel, valid: TokenFile, *, average: WeightAverage | None,
              compute_dtype, log, timing, clock: Clock, progress) -> tuple[dict[str, Any], bool]:
    """Validate and record the epoch, update the schedule's state (plateau lr, best, history) and
    move on to the next epoch (not started: its windows are drawn when it starts). Returns the
    record and whether validation improved on the best epoch so far."""
    record = validate_and_record(s, config, model, valid, average=average, compute_dtype=compute_dtype, log=log,
                                 timing=timing, clock=clock, progress=progress, kind="epoch")
    valid_nll = record["valid_loss"]
    improved = valid_nll < s.best_valid_nll
    if improved:
        s.best_valid_nll = valid_nll
    s.lr = plateau_lr(config, s.lr, improved)
    s.valid_history.append(valid_nll)
    s.epoch_seconds = clock() - s.epoch_started_s
    s.epoch += 1
    s.lengths = None
    s.window = s.position = 0
    return record, improved


def open_log(path: Path, *, tensorboard: bool = False, resumed_at: int | None = None):
    """A log to append text records to: never through a link, only a regular file
    (lmtrain.atomic.open_regular); on the ranks other than the main one, os.devnull. With
    `tensorboard`, its records also go to TensorBoard (lmtrain.training.tensorboard); resumed_at:
    the checkpoint's step when the run resumes."""
    if not distributed.is_main():
        return open(os.devnull, "a", encoding="utf-8")
    file = io.TextIOWrapper(open_regular(path, "ab"), encoding="utf-8")
    return MetricsLog(file, path.parent, resumed_at=resumed_at) if tensorboard else file


def write_record(log, timing, times: dict[str, float], **record) -> dict[str, Any]:
    """One record to metrics.jsonl, and its kind, epoch, step and `times` to timing.jsonl.

    Returns the record with the times."""
    log.write(json.dumps(record) + "\n")
    log.flush()
    timing.write(json.dumps({"kind": record["kind"], "epoch": record["epoch"], "step": record["step"], **times}) + "\n")
    timing.flush()
    return {**record, **times}
