"""Where a command runs and how its randomness starts: device resolution and seeding, shared by
training, evaluation, generation and the tools."""

from __future__ import annotations

import ctypes
import os
import random
import sys

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


# glibc's mallopt parameters, and the size below which freed memory stays with the process
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEPT_BLOCK_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed blocks under KEPT_BLOCK_BYTES for reuse (-> whether it
    took the settings; elsewhere than Linux with glibc nothing changes).

    By default a block over glibc's mmap threshold (which adapts to freed blocks, up to 32 MB) is a
    fresh mapping, returned to the system when freed, so a training step's large tensors (a
    window's logits: bptt x batch x vocab floats, 28 MB at 35 x 20 x 10,000) often pay for their
    pages again as they are first written. Kept, the next step's tensors reuse the same pages:
    our loop at the PyTorch example's configuration on PTB, fp32, 7,925 -> 9,384 tokens/s; the
    fused cross-entropy's backward at 33,278 words, 28.0 -> 5.1 ms (benchmarks/freed_memory.py,
    docs/speed.md). The process's peak memory is unchanged; what it holds between peaks is no
    longer given back. Called once by the console script (lmtrain.cli.main), not by the library
    on import.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no such knob)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_BLOCK_BYTES))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmtrainError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)
