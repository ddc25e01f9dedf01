"""A trained model as saved on disk: a run directory's checkpoints (or one checkpoint file) read
back, checked (lmtrain.model.payload) and built on a device, for evaluate, generate, score,
fine-tuning (train --init-from), the Python API and the tools.

    read_saved(path) -> Saved (config, weights, tokenizer, ...)   the ONE place a path is read
    build_saved(saved, device) -> LanguageModel                    built, weights loaded, eval mode
    load_run(path, device) = both

Every reader goes through `read_saved`, so another saved form (an export directory of
model.safetensors + config.json + the tokenizer) is one more branch there, and every command and
`lmtrain.load` read it at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain.checkpoint import load_first_good, previous_path
from lmtrain.model.hub import is_export, read_payload
from lmtrain.config import Config
from lmtrain.errors import LmtrainError
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.payload import check_payload
from lmtrain.text import Tokenizer


@dataclass
class Saved:
    """What a saved model is, read and checked but not built: its config, vocabulary size, weights
    (a state_dict of CPU float32 tensors), tokenizer, and what the run recorded of its training."""
    path: Path  # the file the weights came from (for messages and provenance)
    config: Config
    vocab_size: int
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    corpus: str  # the training corpus' source: an absolute path or "builtin"
    progress: dict[str, Any]
    corpus_digests: dict[str, str] | None = None  # each split's text digest at training (None: not recorded)


@dataclass
class LoadedRun:
    model: LanguageModel
    tokenizer: Tokenizer
    config: Config
    corpus: str  # the training corpus' source: an absolute path or "builtin"
    progress: dict[str, Any]
    corpus_digests: dict[str, str] | None = None  # each split's text digest at training (None: not recorded)
    path: Path | None = None  # the file the weights came from


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


def read_saved(run: Path, warn: Callable[[str], None] | None = None) -> Saved:
    """A run directory, a checkpoint file or an export directory (lmtrain.model.hub) -> its config, weights and tokenizer, every field
    checked before anything is built. A damaged checkpoint in a run directory is reported through
    `warn` and the next candidate used (checkpoint_candidates)."""
    if is_export(run):  # `lmtrain export --format safetensors`'s directory
        path, payload = read_payload(run)
    else:
        path, payload = load_first_good(checkpoint_candidates(run), warn or (lambda line: None))
    checked = check_payload(path, payload)  # every field, and the shapes, before anything is built
    return Saved(path, checked.config, payload["vocab_size"], payload["model"], checked.tokenizer, payload["corpus"],
                 payload["progress"], payload.get("corpus_digests"))


def build_saved(saved: Saved, device: torch.device) -> LanguageModel:
    """The model `saved` describes, its weights loaded, on `device` in eval mode."""
    try:
        model = LanguageModel(saved.config.model, saved.vocab_size)
        model.load_state_dict(saved.weights)
        model.to(device).eval()
    except (RuntimeError, MemoryError) as e:  # a failed allocation, here or on `device`
        raise LmtrainError(f"{saved.path}: cannot build its model on {device} ({str(e).strip().splitlines()[0][:160]})") from None
    return model


def load_run(run: Path, device: torch.device, warn: Callable[[str], None] | None = None) -> LoadedRun:
    """Load a run directory or checkpoint file, the model on `device` in eval mode (read_saved,
    then build_saved)."""
    saved = read_saved(run, warn)
    return LoadedRun(build_saved(saved, device), saved.tokenizer, saved.config, saved.corpus, saved.progress,
                     saved.corpus_digests, saved.path)
