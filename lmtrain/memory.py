"""How much memory a command may plan to use, so sizes that cannot fit are refused before anything
is allocated (an allocator's traceback minutes later is the alternative).

The limit lives here, in one place: a share of what the machine has available now (Linux's
MemAvailable, else the physical memory), and of the GPU's free memory for tensors placed there.
Estimates are rough upper bounds; they only need to tell "fits" from "cannot possibly fit".
"""

from __future__ import annotations

import os

import torch

from lmtrain.errors import LmtrainError

USABLE_FRACTION = 0.5  # of the memory available now: the rest is the system's, the allocator's slack, ...


def available_bytes(device: torch.device | None = None) -> int:
    """Memory available now: on a CUDA device its free memory, else the host's."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62  # unknown: assume it fits and let the allocator say otherwise


def usable_bytes(device: torch.device | None = None) -> int:
    """The share of `available_bytes` one command plans for."""
    return int(available_bytes(device) * USABLE_FRACTION)


def size_text(n_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1000 or unit == "PB":
            return f"{n_bytes:,.0f} {unit}" if unit == "bytes" else f"{n_bytes:,.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError


def require_fits(need: int, what: str, fix: str, device: torch.device | None = None) -> None:
    """One line, up front, when `need` bytes (an estimate) exceed what may be used."""
    have = usable_bytes(device)
    if need > have:
        where = f" of {device.type.upper()} memory" if device is not None and device.type == "cuda" else ""
        raise LmtrainError(f"{what} needs about {size_text(need)}{where}, more than the {size_text(have)} "
                           f"this machine can spare now (half of what is available); {fix}")
