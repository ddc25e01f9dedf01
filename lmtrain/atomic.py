"""Writing files safely: atomically (a reader sees the old file or the whole new one, never half of
one), and never through a symbolic link or into anything but a regular file.

Every file lmtrain writes in a run directory or a cache goes through `atomic_open` (whole files)
or `open_regular` (files appended to or cut in place: the logs).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from lmtrain.errors import LmtrainError


@contextmanager
def atomic_open(path: Path, before_replace: Callable[[], None] | None = None):
    """Open a temporary file beside `path` for binary writing; on success fsync it and rename it
    over `path`, on any error (or interruption) remove it and leave `path` as it was.

    `before_replace` runs once the new file is whole on disk, just before the rename (to keep
    the old `path` under another name, say). A symbolic link or a non-regular file at `path`
    is refused (LmtrainError) before anything is written."""
    check_regular_or_missing(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_regular_or_missing(path: Path) -> None:
    """Raise LmtrainError when `path` is a symbolic link or exists as anything but a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise LmtrainError(f"{path} is a symbolic link: lmtrain writes no file through a link (remove it)")
    if not stat.S_ISREG(mode):
        raise LmtrainError(f"{path} is not a regular file: lmtrain writes only regular files there (remove it)")


MODES = {"ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "r+b": os.O_RDWR, "rb": os.O_RDONLY}


def open_regular(path: Path, mode: str):
    """Open `path` ("ab", "r+b" or "rb"; binary) without following a symbolic link, and only if it
    is a regular file: a link or a device where a run file should be is an LmtrainError naming it."""
    try:
        fd = os.open(path, MODES[mode] | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # ENXIO: a FIFO with no reader
            check_regular_or_missing(path)
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LmtrainError(f"{path} is not a regular file: lmtrain writes only regular files there (remove it)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)
