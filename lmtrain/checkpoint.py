"""Checkpoints: plain state_dicts and values, written atomically and loaded without unpickling code.

A checkpoint is a dict:
    format      "lmtrain-checkpoint", version 1
    config      the resolved config as nested plain values (lmtrain.config.to_dict)
    corpus      where the corpus came from (an absolute path or "builtin")
    vocab_size  the tokenizer's vocabulary size
    model       the model's state_dict
    optimizer   the optimizer's state_dict
    progress    epoch, step, lr, best_valid_nll
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from lmtrain.atomic import atomic_open
from lmtrain.errors import LmtrainError

FORMAT, VERSION = "lmtrain-checkpoint", 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, fsync, then rename over `path`."""
    with atomic_open(path) as f:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, f)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with `weights_only=True`, so a crafted file cannot run code."""
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise LmtrainError(f"{path} is not an lmtrain checkpoint (not a torch zip archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LmtrainError(f"checkpoint not found: {path}") from None
    except Exception as e:  # weights_only: nothing in the file ran, whatever it held
        first_line = str(e).strip().split("\n")[0][:200]
        raise LmtrainError(f"{path} is not a readable lmtrain checkpoint ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LmtrainError(f"{path} is not an lmtrain checkpoint")
    if payload.get("version") != VERSION:
        raise LmtrainError(f"{path}: unsupported checkpoint version {payload.get('version')}")
    return payload
