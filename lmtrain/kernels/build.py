"""Our C++ CPU ops (torch.ops.lmtrain), built on first use by torch's extension loader.

    lstm_cpu.cpp           the LSTM's time loops and the panel GEMM's ops (lmtrain.kernels.lstm)
    cross_entropy_cpu.cpp  the fused cross-entropy (lmtrain.kernels.cross_entropy)
    step_cpu.cpp           products for one generation step (lmtrain.stepper)

The build is cached per machine under ~/.cache/torch_extensions and redone when a source, a
header or a flag changes. Without a compiler or ninja, or with LMTRAIN_COMPILE=0, `cpu_ops()` is
None and every caller runs its Python version of the same computation.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from functools import cache
from pathlib import Path

import torch

EXTENSION = "lmtrain_cpu"
SOURCES = ("lstm_cpu.cpp", "cross_entropy_cpu.cpp", "step_cpu.cpp")
HEADERS = ("fast_math.h", "panel_gemm.h")


@cache
def _load_cpu_ops():
    """Build (once per machine, cached by torch under ~/.cache/torch_extensions) and load our C++ ops."""
    from torch.utils import cpp_extension

    here = Path(__file__).parent
    # torch rebuilds when the sources or flags change; the headers' hash in the flags covers them too
    header = hashlib.sha256(b"".join((here / name).read_bytes() for name in HEADERS)).hexdigest()[:16]
    try:
        remove_stale_build_lock(cpp_extension)
        # -fopenmp: at::parallel_for runs on torch's OpenMP threads only when compiled with it
        cpp_extension.load(name=EXTENSION, sources=[str(here / name) for name in SOURCES],
                           extra_cflags=["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp",
                                         f"-DLMTRAIN_HEADERS={header}"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return torch.ops.lmtrain
    except Exception as e:  # no compiler, no ninja, a failed build: the Python loops still work
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        warnings.warn(f"lmtrain: compiled kernels unavailable, using the Python code ({reason})", stacklevel=3)
        return None


def remove_stale_build_lock(cpp_extension, stale_after_s: float = 300, poll_s: float = 0.5) -> None:
    """Wait for another process's build to finish, or clear the lock a killed build left behind.

    torch's loader waits, without limit, for the lock file of any build in progress; a build killed
    outright (a stopped session, a SIGKILL) leaves that file behind and every later load hangs on it.
    A live build here takes about a minute, so a lock older than `stale_after_s` is such a leftover."""
    try:
        lock = Path(cpp_extension._get_build_directory(EXTENSION, False)) / "lock"
        while lock.exists():
            if time.time() - lock.stat().st_mtime > stale_after_s:
                lock.unlink(missing_ok=True)
                break
            time.sleep(poll_s)
    except (AttributeError, OSError):
        pass


def cpu_ops():
    """The compiled loops (torch.ops.lmtrain), or None when off (LMTRAIN_COMPILE=0) or unbuildable."""
    if os.environ.get("LMTRAIN_COMPILE", "1") == "0":
        return None
    return _load_cpu_ops()
