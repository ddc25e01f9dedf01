"""The training loop: truncated BPTT over contiguous streams, clipping, lr schedules, NT-ASGD, checkpoints.

Per window: the model's last-layer output -> decoder -> cross-entropy (+ AR and TAR penalties)
-> backward through our recurrences -> gradient clipping -> optimizer step (-> weight average).

It knows nothing of the command line or the terminal: progress goes to a `progress` object
(see lmtrain.progress) and records to `metrics.jsonl` in the run directory, one JSON object per
line: {"kind": "train", ...} every `train.log_interval` steps and {"kind": "epoch", ...} after
each validation. Wall-clock figures go to `timing.jsonl`, so that metrics.jsonl is the same file
for the same config, seed and machine (tests/test_determinism.py).
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtrain.checkpoint import save_checkpoint
from lmtrain.config import Config, TrainConfig, to_dict
from lmtrain.errors import LmtrainError
from lmtrain.evaluate import total_nll
from lmtrain.kernels.cross_entropy import cross_entropy
from lmtrain.model import LanguageModel, detach_state
from lmtrain.progress import QuietProgress
from lmtrain.tokenizer import EOS_ID
from lmtrain.tokens import TokenFile, lazy_batchify


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from and ask torch for deterministic algorithms.

    On the CPU every op of a run is deterministic for a given machine and thread count, so the
    same config and seed give the same metrics.jsonl. On CUDA, deterministic algorithms also need
    CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the process starts; ops that have no deterministic
    CUDA version (the embedding's backward accumulates with atomics) warn instead of failing,
    and their float sums may differ in the last bits from run to run.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # our kernels write every element of the buffers they allocate; filling them with NaN first
    # (torch's default under deterministic algorithms) would only cost memory bandwidth
    torch.utils.deterministic.fill_uninitialized_memory = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmtrainError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def make_optimizer(model: LanguageModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, or SGD for sgd and ntasgd (whose averaging is `WeightAverage`, beside the optimizer)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


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


class WeightAverage:
    """NT-ASGD's average of the weights over every optimizer step since it started.

    `update()` after each step; `swapped_in()` puts the average into the model for a while (for
    validation and checkpoints) and the trained weights back afterwards.
    """

    def __init__(self, model: LanguageModel):
        self.params = list(model.parameters())
        self.average = [p.detach().clone() for p in self.params]
        self.count = 1

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for avg, p in zip(self.average, self.params):
            avg.lerp_(p, 1.0 / self.count)

    @contextmanager
    def swapped_in(self):
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, avg in zip(self.params, self.average):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)


def nt_trigger(history: list[float], nonmono: int) -> bool:
    """NT-ASGD's switch (Merity et al. 2017): the latest validation loss is worse than the best of
    those before the last `nonmono` checks."""
    earlier = history[:-1]
    return len(earlier) > nonmono and history[-1] > min(earlier[:-nonmono])


def train(
    model: LanguageModel,
    config: Config,
    data: dict[str, TokenFile],
    run_dir: Path,
    checkpoint_info: dict[str, Any],
    progress=None,
) -> dict[str, Any]:
    """Train `model` (already on its device) on data["train"], validating on data["valid"].

    Writes last.pt after every epoch, best.pt whenever validation improves, metrics.jsonl (losses
    and learning rates: the same bytes for the same config, seed and machine) and timing.jsonl
    (tokens/s and elapsed seconds of the same records). `checkpoint_info` (corpus source,
    vocabulary size) is stored in every checkpoint. Returns the last epoch record, timing included.
    """
    tc = config.train
    progress = progress or QuietProgress()
    device = model.decoder.weight.device
    decoder_dtype = torch.bfloat16 if tc.precision == "bf16" else None
    inputs, targets = lazy_batchify(data["train"].tokens, tc.batch_size, EOS_ID)  # windows built as they are used
    inputs, targets = inputs.to(device), targets.to(device)
    steps_per_epoch = math.ceil(inputs.size(0) / tc.bptt)
    epochs = tc.epochs if tc.epochs else math.ceil(tc.max_steps / steps_per_epoch)
    if tc.max_steps:
        epochs = min(epochs, math.ceil(tc.max_steps / steps_per_epoch))
    total_steps = tc.max_steps or epochs * steps_per_epoch
    optimizer = make_optimizer(model, tc)
    rng = np.random.default_rng(tc.seed)  # window lengths
    average: WeightAverage | None = None
    valid_history: list[float] = []
    lr = tc.lr
    best_valid_nll = math.inf
    step = 0
    epoch_seconds = 0.0
    started = time.perf_counter()
    record: dict[str, Any] = {}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log, \
            open(run_dir / "timing.jsonl", "a", encoding="utf-8") as timing:
        for epoch in range(1, epochs + 1):
            if epoch > 1 and out_of_time(tc, time.perf_counter() - started, epoch_seconds):
                progress.note(f"stopping before epoch {epoch}: it would end past train.max_minutes = {tc.max_minutes:g}")
                break
            lr = epoch_lr(tc, epoch, lr)
            lengths = window_lengths(inputs.size(0), tc, rng)
            if tc.max_steps:
                lengths = lengths[: tc.max_steps - step]
            progress.start_epoch(epoch, epochs, len(lengths))
            model.train()
            state = model.init_state(tc.batch_size)
            epoch_loss = epoch_tokens = 0.0
            interval_loss = interval_tokens = 0.0
            interval_start = epoch_start = time.perf_counter()
            position = 0
            for length in lengths:
                x, y = inputs[position : position + length], targets[position : position + length]
                position += length
                step_rate = step_lr(tc, lr, step, total_steps) * (length / tc.bptt if tc.variable_bptt else 1.0)
                for group in optimizer.param_groups:
                    group["lr"] = step_rate
                state = detach_state(state)
                raw, dropped, state = model.hidden(x, state)
                logits = model.decode(dropped, decoder_dtype)
                loss = cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).mean()
                objective = loss
                if tc.ar:
                    objective = objective + tc.ar * dropped.pow(2).mean()
                if tc.tar and raw.size(0) > 1:
                    objective = objective + tc.tar * (raw[1:] - raw[:-1]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                (objective * x.size(0) if tc.loss_reduction == "sequence_sum" else objective).backward()
                if tc.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
                optimizer.step()
                if average is not None:
                    average.update()
                step += 1
                loss_value, n = loss.item(), y.numel()
                epoch_loss += loss_value * n
                epoch_tokens += n
                interval_loss += loss_value * n
                interval_tokens += n
                now = time.perf_counter()
                progress.step(loss_value, epoch_tokens / (now - epoch_start), step_rate)
                if step % tc.log_interval == 0:
                    write_record(log, timing, {"tokens_per_s": interval_tokens / (now - interval_start),
                                               "elapsed_s": now - started},
                                 kind="train", epoch=epoch, step=step, lr=step_rate,
                                 loss=interval_loss / interval_tokens,
                                 ppl=math.exp(min(interval_loss / interval_tokens, 50)))
                    interval_loss = interval_tokens = 0.0
                    interval_start = now
            train_seconds = time.perf_counter() - epoch_start
            with average.swapped_in() if average is not None else nullcontext():
                valid_nll_sum, valid_tokens = total_nll(model, data["valid"].tokens, tc.eval_batch_size, tc.bptt,
                                                        decoder_dtype)
                valid_nll = valid_nll_sum / valid_tokens
                record = write_record(
                    log, timing, {"tokens_per_s": epoch_tokens / train_seconds, "elapsed_s": time.perf_counter() - started},
                    kind="epoch", epoch=epoch, step=step, lr=step_rate, averaging=average is not None,
                    train_loss=epoch_loss / epoch_tokens, train_ppl=math.exp(min(epoch_loss / epoch_tokens, 50)),
                    valid_loss=valid_nll, valid_ppl=math.exp(min(valid_nll, 50)),
                )
                progress.end_epoch(record)
                improved = valid_nll < best_valid_nll
                if improved:
                    best_valid_nll = valid_nll
                elif tc.lr_schedule == "plateau":
                    lr /= tc.lr_decay
                payload = {
                    "config": to_dict(config),
                    **checkpoint_info,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "progress": {"epoch": epoch, "step": step, "lr": lr, "valid_nll": valid_nll,
                                 "best_valid_nll": best_valid_nll, "averaging": average is not None},
                }
                save_checkpoint(run_dir / "last.pt", payload)
                if improved:
                    save_checkpoint(run_dir / "best.pt", payload)
            valid_history.append(valid_nll)
            if tc.optimizer == "ntasgd" and average is None and nt_trigger(valid_history, tc.nonmono):
                average = WeightAverage(model)
                progress.note(f"epoch {epoch}: validation has not improved for {tc.nonmono} checks; averaging the weights from here on (NT-ASGD)")
            if tc.max_steps and step >= tc.max_steps:
                break
            epoch_seconds = time.perf_counter() - epoch_start
    return record


def out_of_time(config: TrainConfig, elapsed_s: float, epoch_s: float) -> bool:
    """Whether another epoch as long as the last would end past config.max_minutes."""
    return bool(config.max_minutes) and elapsed_s + epoch_s > 60 * config.max_minutes


def write_record(log, timing, times: dict[str, float], **record) -> dict[str, Any]:
    """One record to metrics.jsonl, and its kind, epoch, step and `times` to timing.jsonl.

    Returns the record with the times."""
    log.write(json.dumps(record) + "\n")
    log.flush()
    timing.write(json.dumps({"kind": record["kind"], "epoch": record["epoch"], "step": record["step"], **times}) + "\n")
    timing.flush()
    return {**record, **times}
