"""One writer at a time: an OS file lock on a lock file, for a run directory or a cache entry.

The lock is `flock(2)` on an open file, so the kernel releases it when the holder dies, SIGKILL
included: no lock file ever goes stale. The file holds the holder's pid, for the message a second
writer gets. Forked children (the encoding pool) share the lock while they live; exec'd ones do
not (the descriptor is close-on-exec).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lmtrain.errors import LmtrainError


def holder_pid(path: Path) -> str:
    """The pid written in a lock file, or '?' when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return "?"
    try:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    return text if text.isdigit() else "?"


@contextmanager
def exclusive(path: Path, what: str, wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock `path` (created if missing, never through a symbolic link) while the block runs.

    `what` names the locked thing for messages ("run directory runs/x"). When another process
    holds the lock: without `wait`, raise LmtrainError naming its pid; with `wait`, tell `wait`
    one line and block until the holder is done.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise LmtrainError(f"{path} is a symbolic link: lmtrain writes no file through a link") from None
        raise LmtrainError(f"cannot lock {what}: {e.strerror} ({path})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(path)
            if wait is None:
                raise LmtrainError(f"{what} is in use by another lmtrain process (pid {pid}); "
                                   "wait for it to finish, or stop it") from None
            wait(f"waiting for {what}, in use by another lmtrain process (pid {pid})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting process)
