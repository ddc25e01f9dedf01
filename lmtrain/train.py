"""The training loop: truncated BPTT over contiguous streams, clipping, lr schedule, checkpoints.

It knows nothing of the command line or the terminal: progress goes to a `progress` object
(see lmtrain.progress) and records to `metrics.jsonl` in the run directory, one JSON object per
line: {"kind": "train", ...} every `train.log_interval` steps and {"kind": "epoch", ...} after
each validation.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmtrain.checkpoint import save_checkpoint
from lmtrain.config import Config, TrainConfig, to_dict
from lmtrain.errors import LmtrainError
from lmtrain.evaluate import total_nll
from lmtrain.model import LanguageModel, detach_state
from lmtrain.progress import QuietProgress
from lmtrain.tokenizer import EOS_ID
from lmtrain.tokens import TokenFile, batchify, windows


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmtrainError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def make_optimizer(model: LanguageModel, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def epoch_lr(config: TrainConfig, epoch: int, plateau_lr: float) -> float:
    """The learning rate of `epoch` (1-based) under the configured schedule."""
    if config.lr_schedule == "epoch":
        return config.lr / config.lr_decay ** max(0, epoch - config.lr_decay_start)
    return plateau_lr


def min_train_tokens(config: TrainConfig) -> int:
    """Tokens needed for one full batch: batch_size streams of bptt inputs."""
    return config.batch_size * config.bptt


def train(
    model: LanguageModel,
    config: Config,
    data: dict[str, TokenFile],
    run_dir: Path,
    checkpoint_info: dict[str, Any],
    progress=None,
) -> dict[str, Any]:
    """Train `model` (already on its device) on data["train"], validating on data["valid"].

    Writes last.pt after every epoch, best.pt whenever validation improves, and metrics.jsonl.
    `checkpoint_info` (corpus source, vocabulary size) is stored in every checkpoint.
    Returns the last epoch record.
    """
    tc = config.train
    progress = progress or QuietProgress()
    device = model.decoder.weight.device
    inputs, targets = batchify(data["train"].tokens, tc.batch_size, EOS_ID)
    inputs, targets = inputs.to(device), targets.to(device)
    steps_per_epoch = math.ceil(inputs.size(0) / tc.bptt)
    epochs = tc.epochs if tc.epochs else math.ceil(tc.max_steps / steps_per_epoch)
    if tc.max_steps:
        epochs = min(epochs, math.ceil(tc.max_steps / steps_per_epoch))
    optimizer = make_optimizer(model, tc)
    lr = tc.lr
    best_valid_nll = math.inf
    step = 0
    started = time.perf_counter()
    record: dict[str, Any] = {}
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
        for epoch in range(1, epochs + 1):
            lr = epoch_lr(tc, epoch, lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            epoch_steps = min(steps_per_epoch, tc.max_steps - step) if tc.max_steps else steps_per_epoch
            progress.start_epoch(epoch, epochs, epoch_steps)
            model.train()
            state = model.init_state(tc.batch_size)
            epoch_loss = epoch_tokens = 0.0
            interval_loss = interval_tokens = 0.0
            interval_start = epoch_start = time.perf_counter()
            for x, y in windows(inputs, targets, tc.bptt):
                state = detach_state(state)
                logits, state = model(x, state)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                (loss * x.size(0) if tc.loss_reduction == "sequence_sum" else loss).backward()
                if tc.clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
                optimizer.step()
                step += 1
                loss_value, n = loss.item(), y.numel()
                epoch_loss += loss_value * n
                epoch_tokens += n
                interval_loss += loss_value * n
                interval_tokens += n
                now = time.perf_counter()
                progress.step(loss_value, epoch_tokens / (now - epoch_start), lr)
                if step % tc.log_interval == 0:
                    write_record(log, kind="train", epoch=epoch, step=step, lr=lr,
                                 loss=interval_loss / interval_tokens,
                                 ppl=math.exp(min(interval_loss / interval_tokens, 50)),
                                 tokens_per_s=interval_tokens / (now - interval_start),
                                 elapsed_s=now - started)
                    interval_loss = interval_tokens = 0.0
                    interval_start = now
                if tc.max_steps and step >= tc.max_steps:
                    break
            train_seconds = time.perf_counter() - epoch_start
            valid_nll_sum, valid_tokens = total_nll(model, data["valid"].tokens, tc.eval_batch_size, tc.bptt)
            valid_nll = valid_nll_sum / valid_tokens
            record = write_record(
                log, kind="epoch", epoch=epoch, step=step, lr=lr,
                train_loss=epoch_loss / epoch_tokens, train_ppl=math.exp(min(epoch_loss / epoch_tokens, 50)),
                valid_loss=valid_nll, valid_ppl=math.exp(min(valid_nll, 50)),
                tokens_per_s=epoch_tokens / train_seconds, elapsed_s=time.perf_counter() - started,
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
                "progress": {"epoch": epoch, "step": step, "lr": lr, "valid_nll": valid_nll, "best_valid_nll": best_valid_nll},
            }
            save_checkpoint(run_dir / "last.pt", payload)
            if improved:
                save_checkpoint(run_dir / "best.pt", payload)
    return record


def write_record(log, **record) -> dict[str, Any]:
    log.write(json.dumps(record) + "\n")
    log.flush()
    return record
