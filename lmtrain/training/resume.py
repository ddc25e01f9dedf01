"""Exact resume: the training loop's state as plain values, every random generator's state, and
putting a run directory back to the moment of its last checkpoint.

A run stopped at any step and resumed ends with the same weights, bit for bit, and the same
metrics.jsonl, byte for byte, as a run that was never stopped (tests/test_resume.py), because
last.pt holds, besides the model and the optimizer:

    loop      LoopState: epoch, step, the epoch's window lengths and how many are done, the
              lr schedule's state, the validation history, the running loss sums
    hidden    the recurrent state carried into the next window (the key's old name, kept so that
              older checkpoints resume; in the code it is `state`, and `hidden` means a layer's outputs h)
    average   NT-ASGD's averaged weights and their count, once averaging has started
    trained   the trained weights while `model` holds the average (else None: `model` is them)
    rng       python `random`, numpy's global generator, torch's CPU (and CUDA) generators, and
              the numpy Generator that draws variable BPTT window lengths
    data      sha256 of the training and validation tokens, so a changed corpus is refused

and because resuming first cuts metrics.jsonl and timing.jsonl back to their length at that
checkpoint: whatever a run wrote after its last checkpoint (records of steps it will redo, or the
'stop' record of a train.max_steps stop mid-epoch) goes, and the resumed run writes it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmtrain.atomic import open_regular
from lmtrain.checkpoint import CheckpointDamaged, load_checkpoint, previous_path
from lmtrain.config import RESUMABLE_KEYS, Config, from_dict, to_dict
from lmtrain.errors import LmtrainError
from lmtrain.runs import is_temporary, run_files


@dataclass
class LoopState:
    """Where the training loop is, as plain values (the loop updates it in place)."""

    lr: float  # the base lr of the epoch (epoch and plateau schedules)
    epoch: int = 1  # the epoch in progress, or the next to start when `lengths` is None
    step: int = 0  # optimizer steps so far, skipped (non-finite) ones included
    lengths: list[int] | None = None  # this epoch's BPTT window lengths; None: not started yet
    window: int = 0  # windows of this epoch done
    position: int = 0  # rows of this epoch done: sum(lengths[:window])
    last_rate: float = 0.0  # the lr of the latest step (an epoch record's lr)
    best_valid_nll: float = math.inf  # over epoch ends only (a mid-epoch stop's check does not count)
    valid_history: list[float] = field(default_factory=list)  # every epoch end's (NT-ASGD's switch)
    epoch_loss: float = 0.0  # sums over the epoch's good steps: loss x tokens, tokens
    epoch_tokens: float = 0.0
    interval_loss: float = 0.0  # the same since the last train record
    interval_tokens: float = 0.0
    epoch_bad: int = 0  # skipped steps: this epoch, since the last train record, in a row
    interval_bad: int = 0
    bad_in_row: int = 0
    elapsed_s: float = 0.0  # training seconds (this process and those before it), for train.max_minutes
    epoch_started_s: float = 0.0  # elapsed_s when this epoch started
    epoch_seconds: float = 0.0  # how long the last finished epoch took
    metrics_bytes: int = 0  # the lengths of metrics.jsonl and timing.jsonl at this checkpoint
    timing_bytes: int = 0


def loop_from_dict(values: dict[str, Any]) -> LoopState:
    names = {f.name for f in dataclasses.fields(LoopState)}
    return LoopState(**{k: v for k, v in values.items() if k in names})


def rng_states(window_rng: np.random.Generator) -> dict[str, Any]:
    """Every generator a training step draws from, as values torch.load(weights_only=True) reads."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "window_lengths": window_rng.bit_generator.state,
    }


def set_rng_states(states: dict[str, Any], window_rng: np.random.Generator) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.array(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    window_rng.bit_generator.state = states["window_lengths"]


def state_to_lists(state) -> list[list[torch.Tensor]] | None:
    return None if state is None else [[t.detach() for t in layer] for layer in state]


def state_from_lists(stored, device: torch.device):
    return None if stored is None else [tuple(t.to(device) for t in layer) for layer in stored]


def data_digest(data: dict) -> str:
    """sha256 of the training and validation token ids: a resumed run must see the same data."""
    h = hashlib.sha256()
    for split in ("train", "valid"):
        tokens = np.ascontiguousarray(data[split].tokens)
        h.update(f"{split}:{tokens.dtype.str}:{len(tokens)}:".encode())
        h.update(memoryview(tokens).cast("B"))
    return h.hexdigest()


# --- before resuming: the command's settings ------------------------------------------------------


def check_resume_overrides(overrides: list[str]) -> None:
    """Only the stopping keys may change on resume; anything else is refused naming the key."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise LmtrainError(
                f"--set {key}: a resumed run keeps its config; only {', '.join(RESUMABLE_KEYS)} can change "
                "with --resume (start a new run to change anything else)"
            )


def check_same_config(config: Config, stored: dict[str, dict[str, Any]], where: Path, checkpoint: Path) -> None:
    """`config` (RUN/config.toml and the --set overrides) must be the checkpoint's but for the stopping keys.
    A key newer than the checkpoint counts as its default there, as it does in RUN/config.toml."""
    try:
        stored = to_dict(from_dict(stored))
    except LmtrainError:
        pass  # compared as stored: the first key that differs is named below
    for section, table in to_dict(config).items():
        for key, value in table.items():
            name = f"{section}.{key}"
            old = stored.get(section, {}).get(key)
            if name not in RESUMABLE_KEYS and old != value:
                raise LmtrainError(
                    f"{where} sets {name} = {value!r} but {checkpoint} was trained with {old!r}: a run resumes with "
                    f"the config it started with (put {name} back, or start a new run)"
                )


# --- resuming: putting the run directory back to the checkpoint -----------------------------------


def load_resume_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """RUN/last.pt, or RUN/last.prev.pt (reported through `warn`) when last.pt is damaged."""
    last = run_dir / "last.pt"
    candidates = [p for p in (last, previous_path(last)) if p.is_file()]
    if not candidates:
        raise LmtrainError(f"{run_dir} holds no checkpoint to resume from (no last.pt): it stopped before its "
                           "first checkpoint; start it again with --force")
    first_damage: CheckpointDamaged | None = None
    for k, path in enumerate(candidates):
        try:
            payload = load_checkpoint(path)
        except CheckpointDamaged as e:
            first_damage = first_damage or e
            if k + 1 < len(candidates):
                warn(f"warning: {e}; resuming from {candidates[k + 1]} instead")
            continue
        if "resume" not in payload:
            raise LmtrainError(f"{path} was written by an lmtrain without exact resume (checkpoint version "
                               f"{payload.get('version')}): it can be evaluated, not resumed")
        return path, payload
    raise first_damage


def set_aside_damaged(run_dir: Path, used: Path, say: Callable[[str], None]) -> None:
    """When resuming from last.prev.pt, move the damaged last.pt out of the way, so that the next
    save does not keep it as the 'previous good' checkpoint over the one we resumed from."""
    last = run_dir / "last.pt"
    if used != last and last.is_file():
        os.replace(last, last.with_name("last.pt.damaged"))
        say(f"moved the damaged {last} to {last.with_name('last.pt.damaged')}")


def remove_partial_files(run_dir: Path) -> None:
    """Temporary files of writes that a killed process left (lmtrain.atomic names them .NAME.*.part);
    a user's own .*.part files stay (lmtrain.runs.is_temporary)."""
    for path in run_files(run_dir):
        if is_temporary(path.name):
            path.unlink(missing_ok=True)


def cut_log(path: Path, size: int) -> None:
    """Truncate a log back to `size` bytes, its length when the checkpoint was written."""
    have = path.stat().st_size if path.is_file() else 0
    if have < size:
        raise LmtrainError(f"{path} is shorter ({have:,} bytes) than when the checkpoint was written ({size:,} bytes): "
                           "it was edited or replaced, so the run cannot be resumed exactly")
    if have > size:
        with open_regular(path, "r+b") as f:  # never through a link (lmtrain.runs.check_run_files came first)
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())


def check_logs(run_dir: Path, loop: LoopState) -> None:
    for name, size in (("metrics.jsonl", loop.metrics_bytes), ("timing.jsonl", loop.timing_bytes)):
        have = (run_dir / name).stat().st_size if (run_dir / name).is_file() else 0
        if have < size:
            raise LmtrainError(f"{run_dir / name} is shorter ({have:,} bytes) than when the checkpoint was written "
                               f"({size:,} bytes): it was edited or replaced, so the run cannot be resumed exactly")


def cut_logs(run_dir: Path, loop: LoopState) -> None:
    cut_log(run_dir / "metrics.jsonl", loop.metrics_bytes)
    cut_log(run_dir / "timing.jsonl", loop.timing_bytes)


def restore_best(run_dir: Path, step: int, say: Callable[[str], None]) -> None:
    """Make best.pt what an uninterrupted run has at `step`: the best epoch end's model so far.

    A train.max_steps stop mid-epoch may have written best.pt (so that a step-limited run ends
    with its best model there), and a run killed between writing best.pt and last.pt leaves a
    best.pt newer than the checkpoint resumed from. Either is replaced by best.prev.pt when that
    one qualifies, else removed: the resumed run writes best.pt again when it gets there.
    """
    best, kept = run_dir / "best.pt", previous_path(run_dir / "best.pt")
    if not best.is_file() or epoch_best_until(best, step):
        return
    if kept.is_file() and epoch_best_until(kept, step):
        os.replace(kept, best)
        say(f"best.pt: back to the best epoch before step {step:,} (the one after it came from a stop or a later step)")
        return
    best.unlink()
    kept.unlink(missing_ok=True)
    say(f"best.pt: removed (no epoch before step {step:,} wrote it); training writes it again")


def epoch_best_until(path: Path, step: int) -> bool:
    try:
        progress = load_checkpoint(path).get("progress")
    except LmtrainError:
        return False
    if not isinstance(progress, dict):  # not a checkpoint lmtrain wrote: it does not qualify
        return False
    at_step = progress.get("step")
    return progress.get("at", "epoch") == "epoch" and isinstance(at_step, int) and at_step <= step
