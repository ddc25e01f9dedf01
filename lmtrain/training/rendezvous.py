"""Joining torchrun's process group: the environment it sets, checked, and a rendezvous that
gives up after a while instead of waiting for ranks that never come.

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every rank. Set by
hand, without torchrun, a missing one was a KeyError, and a WORLD_SIZE of 2 with one process
waited an hour (the collectives' timeout, lmtrain.training.distributed.TIMEOUT) for the other. Here the
ranks meet within LMTRAIN_RENDEZVOUS_TIMEOUT seconds (120 by default) or stop with one line;
once they have met, collectives wait up to the hour as before.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import torch.distributed as dist

from lmtrain.errors import LmtrainError

# the other ranks wait in a collective while the main rank trains the tokenizer and encodes the
# corpus, which takes minutes on a large one; torch's default would be 10 minutes with NCCL
TIMEOUT = timedelta(hours=1)
RENDEZVOUS_TIMEOUT_ENV = "LMTRAIN_RENDEZVOUS_TIMEOUT"
RENDEZVOUS_TIMEOUT_S = 120.0


GROUP_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def group_environment() -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) as torchrun sets them, checked: one line naming what is
    missing or wrong, where torch would raise a KeyError or wait."""
    missing = [name for name in GROUP_VARIABLES if name not in os.environ]
    if missing:
        raise LmtrainError(
            f"WORLD_SIZE is set (to {os.environ['WORLD_SIZE']!r}) but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: start several processes with `lmtrain train --nproc N` "
            "or torchrun, or unset WORLD_SIZE to train in one process"
        )
    world = env_int("WORLD_SIZE", None, 1)
    rank_ = env_int("RANK", None, 0)
    if rank_ >= world:
        raise LmtrainError(f"RANK {rank_} is not below WORLD_SIZE {world}")
    port = env_int("MASTER_PORT", None, 1)
    if port > 65535:
        raise LmtrainError(f"MASTER_PORT must be a port number (1 to 65535), got {port}")
    return world, rank_, env_int("LOCAL_RANK", None, 0)


def env_int(name: str, default: int | None, least: int) -> int:
    """The environment variable `name` as an integer of at least `least` (`default` when unset)."""
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = None
    if value is None or value < least:
        raise LmtrainError(f"environment variable {name} must be an integer of at least {least}, got {raw!r}")
    return value


def rendezvous_timeout() -> timedelta:
    """How long a rank waits for the others to join: LMTRAIN_RENDEZVOUS_TIMEOUT seconds, or
    RENDEZVOUS_TIMEOUT_S."""
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise LmtrainError(f"{RENDEZVOUS_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def join_group(backend: str, **options) -> None:
    """init_process_group through torchrun's env:// rendezvous, bounded by `rendezvous_timeout`
    while the ranks meet and the backend connects them; collectives then wait up to TIMEOUT
    (the other ranks wait in one while the main rank prepares the corpus)."""
    wait = rendezvous_timeout()
    try:
        store, rank_, world = next(dist.rendezvous("env://", timeout=wait))
        store.set_timeout(wait)
        # as init_process_group does with a store of its own making: keys apart from other users of it
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank_, world_size=world,
                                timeout=TIMEOUT, **options)
        store.set_timeout(TIMEOUT)
    except (RuntimeError, ValueError) as e:  # torch's DistStoreError (a timeout) is a RuntimeError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise LmtrainError(
            f"rank {os.environ['RANK']}: the {os.environ['WORLD_SIZE']} processes did not meet at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {wait.total_seconds():g} s ({reason}); "
            f"start every rank (`lmtrain train --nproc N` or torchrun), or set {RENDEZVOUS_TIMEOUT_ENV} to wait longer"
        ) from None
