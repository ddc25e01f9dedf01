"""best.pt and last.pt written by the loop, and the loop's state put back from last.pt (the payload's resume entry is described in lmtrain.training.resume)."""

from __future__ import annotations

import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtrain.checkpoint import save_checkpoint
from lmtrain.config import Config, to_dict
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel
from lmtrain.training import distributed
from lmtrain.training.averaging import WeightAverage
from lmtrain.training.resume import LoopState, state_from_lists, state_to_lists, loop_from_dict, rng_states, set_rng_states


class Saver:
    """Writes best.pt and last.pt for the loop: the weights to evaluate under "model", and in
    last.pt everything `restore_loop` needs (lmtrain.training.resume)."""

    def __init__(self, run_dir: Path, config: Config, info: dict[str, Any], digest: str, *, model: LanguageModel,
                 optimizer: torch.optim.Optimizer, window_rng: np.random.Generator, log, timing):
        self.run_dir, self.config, self.info, self.digest = run_dir, config, info, digest
        self.model, self.optimizer, self.window_rng, self.log, self.timing = model, optimizer, window_rng, log, timing

    def log_sizes(self) -> tuple[int, int]:
        """metrics.jsonl and timing.jsonl's lengths in bytes, flushed to disk first: a checkpoint
        must never point past what is really there."""
        if not distributed.is_main():  # its logs go to os.devnull
            return 0, 0
        sizes = []
        for f in (self.log, self.timing):
            f.flush()
            os.fsync(f.fileno())
            sizes.append(os.fstat(f.fileno()).st_size)
        return sizes[0], sizes[1]

    def save(self, s: LoopState, average: WeightAverage | None, state, elapsed_s: float, at: str, *,
             epoch: int | None = None, valid_nll: float | None = None, best: bool = False,
             logs_at: tuple[int, int] | None = None) -> None:
        """`at`: "epoch" (an epoch end; `epoch` is the one that ended), "stop" (train.max_steps
        mid-epoch; `logs_at` the logs' sizes before its record) or "step" (anywhere else)."""
        last = self.run_dir / "last.pt"
        for name, tensors in (("weights", self.model.parameters()), ("averaged weights", average.average if average else [])):
            if not all(torch.isfinite(t).all() for t in tensors):
                raise LmtrainError(f"the model's {name} are not finite at step {s.step:,}: not saving them over the "
                                   f"last good checkpoint {last} (a lower train.lr or a train.clip may help)")
        if not distributed.is_main():  # every rank holds the same weights; one writes them
            return
        s.elapsed_s = elapsed_s
        s.metrics_bytes, s.timing_bytes = logs_at or self.log_sizes()
        trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if average is not None else None
        with average.swapped_in() if average is not None else nullcontext():
            payload = {
                "config": to_dict(self.config),
                **self.info,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "progress": {"epoch": epoch or s.epoch, "step": s.step, "lr": s.lr, "valid_nll": valid_nll,
                             "best_valid_nll": s.best_valid_nll, "averaging": average is not None, "at": at},
            }
            if best:
                save_checkpoint(self.run_dir / "best.pt", payload)
            save_checkpoint(last, {**payload, "resume": {
                "loop": dataclasses.asdict(s),
                "hidden": state_to_lists(state),
                "average": average.state() if average is not None else None,
                "trained": trained,
                "rng": rng_states(self.window_rng),
                "data": self.digest,
                "processes": distributed.world_size(),
            }})


def restore_loop(payload: dict[str, Any], model: LanguageModel, optimizer: torch.optim.Optimizer,
                 window_rng: np.random.Generator, device: torch.device):
    """Put the optimizer, the generators and NT-ASGD's average back as last.pt has them; return
    the loop state, the average (or None) and the recurrent state to carry."""
    entry = payload["resume"]
    optimizer.load_state_dict(payload["optimizer"])
    average = None
    if entry["average"] is not None:
        average = WeightAverage(model)
        average.load(entry["average"])
    set_rng_states(entry["rng"], window_rng)
    return loop_from_dict(entry["loop"]), average, state_from_lists(entry["hidden"], device)
