"""Where a command runs and how its randomness starts: device resolution and seeding, shared by
training, evaluation, generation and the tools."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from lmtrain.errors import LmtrainError


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from and ask torch for deterministic algorithms.

    On the CPU every op of a run is deterministic for a given machine and thread count, so the
    same config and seed give the same metrics.jsonl. On CUDA, deterministic algorithms also need
    CUBLAS_WORKSPACE_CONFIG=:4096:8 before cuBLAS starts: it is set here unless already set (without
    it torch warns on every cuBLAS call, thousands of times a window). Ops that have no
    deterministic CUDA version (the embedding's backward accumulates with atomics) warn instead of
    failing, and their float sums may differ in the last bits from run to run.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
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
