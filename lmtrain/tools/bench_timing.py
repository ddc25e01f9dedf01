"""The timing plumbing of the benchmarks (lmtrain.tools.bench, bench_generate): interleaved medians,
peak tensor memory, float32 without TF32, an environment variable for one candidate."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Hashable
from contextlib import contextmanager

import torch


@contextmanager
def full_fp32():
    """TF32 off for cuDNN and cuBLAS for the block (cuDNN's LSTM takes it by default; ours never),
    so that fp32 compares float32 arithmetic with float32 arithmetic. Restored after."""
    kept = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = kept


def with_env(name: str, value: str, run: Callable[[], None]) -> Callable[[], None]:
    """run with the environment variable set for its duration."""
    def wrapped():
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            run()
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before

    return wrapped


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round_robin(runs: dict[Hashable, Callable[[], None]], repeats: int, warmup: int,
                     device: torch.device) -> dict[Hashable, float]:
    """Median seconds per call of each run, by its key, interleaved: one call of each per round."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds: dict[Hashable, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def peak_memory_mb(run: Callable[[], None], device: torch.device) -> float:
    """Peak tensor memory (MB) allocated by one call of `run`, above what was held before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                record_shapes=True, with_stack=True) as prof:
        run()
    try:  # the profiler's allocation timeline: every tensor's creation and destruction, in order
        from torch.profiler._memory_profiler import Action

        changes, created = [], set()
        for _, action, (key, _), size in prof._memory_profile().timeline:
            if action == Action.CREATE:
                created.add(key)
                changes.append(size)
            elif action == Action.DESTROY and key in created:  # not what was held before: a gradient of
                changes.append(-size)  # the last call freed during this one would lower the count
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError):  # a torch without it: per-operator accounting
        changes = [e.self_cpu_memory_usage for e in sorted(prof.events(), key=lambda e: e.time_range.start)]
    held = peak = 0
    for change in changes:
        held += change
        peak = max(peak, held)
    return peak / 2**20
