"""A trained model as saved on disk: a run directory's checkpoints (or one checkpoint file) read
back, checked (lmtrain.model.payload) and built on a device, for evaluate, generate and the tools."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain.checkpoint import load_first_good, previous_path
from lmtrain.config import Config
from lmtrain.errors import LmtrainError
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.payload import check_payload
from lmtrain.text import Tokenizer


@dataclass
class LoadedRun:
    model: LanguageModel
    tokenizer: Tokenizer
    config: Config
    corpus: str  # the training corpus' source: an absolute path or "builtin"
    progress: dict[str, Any]
    corpus_digests: dict[str, str] | None = None  # each split's text digest at training (None: not recorded)


def checkpoint_candidates(run: Path) -> list[Path]:
    """RUN/best.pt, then the checkpoints that stand in when it is damaged or missing (best.prev.pt,
    last.pt, last.prev.pt), for a run directory; or the file itself."""
    if not run.exists():
        raise LmtrainError(f"run not found: {run}")
    if not run.is_dir():
        return [run]
    best, last = run / "best.pt", run / "last.pt"
    found = [p for p in (best, previous_path(best), last, previous_path(last)) if p.is_file()]
    if not found:
        raise LmtrainError(f"{run} holds no checkpoint (best.pt or last.pt)")
    return found


def load_run(run: Path, device: torch.device, warn=None) -> LoadedRun:
    """Load a run directory or checkpoint file, the model on `device` in eval mode. A damaged
    checkpoint in a run directory is reported through `warn` and the next candidate used."""
    path, payload = load_first_good(checkpoint_candidates(run), warn or (lambda line: None))
    checked = check_payload(path, payload)  # every field, and the shapes, before anything is built
    config = checked.config
    try:
        model = LanguageModel(config.model, payload["vocab_size"])
        model.load_state_dict(payload["model"])
        model.to(device).eval()
    except (RuntimeError, MemoryError) as e:  # a failed allocation, here or on `device`
        raise LmtrainError(f"{path}: cannot build its model on {device} ({str(e).strip().splitlines()[0][:160]})") from None
    return LoadedRun(model, checked.tokenizer, config, payload["corpus"], payload["progress"], payload.get("corpus_digests"))
