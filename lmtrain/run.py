"""Run directories: what `train` writes and what `evaluate` and `generate` read back.

    RUN/
      config.toml       the resolved config (defaults < file < --set)
      tokenizer.model   the sentencepiece model trained on the training split
      metrics.jsonl     one JSON record per log interval and per epoch
      best.pt           checkpoint with the best validation loss so far
      last.pt           checkpoint after the latest epoch

Checkpoints are self-contained: each also holds the tokenizer, so a single .pt file can be
evaluated or sampled from on its own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain.atomic import atomic_open
from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import Config, from_dict, to_toml
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel
from lmtrain.tokenizer import Tokenizer
from lmtrain.train import seed_everything

RUN_MARKER = "config.toml"


def start_run(run_dir: Path, config: Config, tokenizer: Tokenizer, corpus_source: str, overwrite: bool,
              device: torch.device) -> tuple[LanguageModel, dict[str, Any]]:
    """Make the run directory with its config and tokenizer, and build the seeded model on `device`.

    Returns the model and what every checkpoint of the run stores besides it (corpus, tokenizer).
    """
    create_run_dir(run_dir, overwrite)
    write_run_files(run_dir, config, tokenizer)
    seed_everything(config.train.seed)
    model = LanguageModel(config.model, tokenizer.vocab_size).to(device)
    return model, {"corpus": corpus_source, **tokenizer_info(tokenizer)}


def create_run_dir(path: Path, overwrite: bool) -> None:
    """Make an empty run directory; an existing run is replaced only with `overwrite`."""
    try:
        make_empty_dir(path, overwrite)
    except OSError as e:
        raise LmtrainError(f"cannot create run directory {path}: {e.strerror}") from None


def make_empty_dir(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not path.is_dir():
            raise LmtrainError(f"run directory {path} exists and is not a directory")
        if any(path.iterdir()):
            if not overwrite:
                raise LmtrainError(f"run directory {path} already exists and is not empty (pass --overwrite to replace it)")
            if not (path / RUN_MARKER).is_file():
                raise LmtrainError(f"refusing to overwrite {path}: it is not an lmtrain run directory")
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def write_run_files(run_dir: Path, config: Config, tokenizer: Tokenizer) -> None:
    with atomic_open(run_dir / "tokenizer.model") as f:
        f.write(tokenizer.model_proto)
    with atomic_open(run_dir / RUN_MARKER) as f:
        f.write(to_toml(config).encode("utf-8"))


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint stores of the tokenizer."""
    return {"tokenizer": {"kind": tokenizer.kind, "model": tokenizer.model_proto}, "vocab_size": tokenizer.vocab_size}


@dataclass
class LoadedRun:
    model: LanguageModel
    tokenizer: Tokenizer
    config: Config
    corpus: str  # the training corpus' source: an absolute path or "builtin"
    progress: dict[str, Any]


def checkpoint_path(run: Path) -> Path:
    """RUN/best.pt for a run directory (last.pt if no best yet), or the file itself."""
    if not run.exists():
        raise LmtrainError(f"run not found: {run}")
    if run.is_dir():
        for name in ("best.pt", "last.pt"):
            if (run / name).is_file():
                return run / name
        raise LmtrainError(f"{run} holds no checkpoint (best.pt or last.pt)")
    return run


def load_run(run: Path, device: torch.device) -> LoadedRun:
    """Load a run directory or checkpoint file, the model on `device` in eval mode."""
    path = checkpoint_path(run)
    payload = load_checkpoint(path)
    try:
        config = from_dict(payload["config"])
        tokenizer = Tokenizer(payload["tokenizer"]["model"], payload["tokenizer"]["kind"])
        model = LanguageModel(config.model, payload["vocab_size"])
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise LmtrainError(f"{path}: checkpoint content does not match this version of lmtrain ({str(e).splitlines()[0][:160]})") from None
    model.to(device).eval()
    return LoadedRun(model, tokenizer, config, payload["corpus"], payload["progress"])
