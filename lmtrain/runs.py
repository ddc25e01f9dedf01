"""What makes a directory an lmtrain run, which files in it are lmtrain's, and the one way a run
directory is made, replaced (`--force`) and locked.

    RUN/.lmtrain-run   the marker, {"format": "lmtrain-run", "version": 1}: the first file lmtrain
                       writes when it makes a run directory, so even a run cut short by a full
                       disk is recognised (and `--force` can clear it); a fine-tuned run's
                       (train --init-from) also says where it came from, under "init_from"
    RUN/.lock          held (lmtrain.locks) by the one process writing the run, for the whole of
                       `train` and `train --resume`

A run from before the marker is recognised by a config.toml that parses as lmtrain's together
with metrics.jsonl or a checkpoint. `--force` removes only the files lmtrain writes in a run
(RUN_FILES and their temporaries), never a tree: whatever else is in the directory stays. And it
refuses places whose loss would hurt however the files were named: the current directory (or one
above it), the home directory, a directory holding the corpus or lmtrain's cache, a symbolic link.
A link or a non-regular file where a run file should be is an error naming it, found before
anything in the run changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tomllib
from contextlib import ExitStack
from pathlib import Path

from lmtrain.atomic import atomic_open, check_regular_or_missing
from lmtrain.errors import LmtrainError
from lmtrain.locks import exclusive

MARKER = ".lmtrain-run"
LOCK = ".lock"
FORMAT, VERSION = "lmtrain-run", 1
CHECKPOINTS = ("best.pt", "last.pt", "best.prev.pt", "last.prev.pt")
# every file lmtrain writes in a run directory: train (lmtrain.training.setup, lmtrain.training.loop, lmtrain.checkpoint),
# train --resume (lmtrain.training.resume: last.pt.damaged), report (lmtrain.tools.report)
RUN_FILES = (MARKER, LOCK, "config.toml", "tokenizer.model", "metrics.jsonl", "timing.jsonl", *CHECKPOINTS,
             "last.pt.damaged", "report.md", "curves.png")
# temporaries are .NAME.<random>.part (lmtrain.atomic, lmtrain.checkpoint.keep_as), and
# .write-check.<random>.part (lmtrain.training.setup.check_writable)
TEMPORARY_STEMS = (*RUN_FILES, "write-check")
CONFIG_SECTIONS = ("tokenizer", "model", "train")


def is_temporary(name: str) -> bool:
    """Whether `name` is one of lmtrain's temporary files in a run directory (never a user's .x.part)."""
    return name.endswith(".part") and any(name.startswith(f".{stem}.") for stem in TEMPORARY_STEMS)


def is_run_file(name: str) -> bool:
    return name in RUN_FILES or is_temporary(name)


def run_files(run: Path) -> list[Path]:
    """lmtrain's files present in `run` (links and non-regular files of those names included)."""
    try:
        names = sorted(entry.name for entry in os.scandir(run))
    except FileNotFoundError:
        return []
    return [run / name for name in names if is_run_file(name)]


def is_marked(run: Path) -> bool:
    """Whether `run` holds lmtrain's marker, a regular file with the marker's format name."""
    path = run / MARKER
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        return json.loads(path.read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_legacy_run(run: Path) -> bool:
    """A run from before the marker: a config.toml that parses as lmtrain's, with metrics.jsonl or a checkpoint."""
    try:
        config = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        return False
    if not config or set(config) - set(CONFIG_SECTIONS) or not all(isinstance(v, dict) for v in config.values()):
        return False
    return any((run / name).is_file() for name in ("metrics.jsonl", *CHECKPOINTS))


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a directory lmtrain made for a run (marked, or a run from before the marker)."""
    return path.is_dir() and (is_marked(path) or is_legacy_run(path))


def is_empty(path: Path) -> bool:
    """Holds nothing, or only what a start that failed at once leaves: the lock file, temporaries."""
    return all(entry.name == LOCK or is_temporary(entry.name) for entry in os.scandir(path))


def check_run_files(run: Path) -> None:
    """Every lmtrain file in `run` is a regular file: a link (or a device, a directory) where a run
    file should be is an LmtrainError naming it. Call it before changing anything in the run."""
    for path in run_files(run):
        check_regular_or_missing(path)


def write_marker(run: Path, origin: dict | None = None) -> None:
    """The marker; `origin`: where a fine-tuned run came from (lmtrain.training.finetune), kept in it
    as "init_from" so that the run directory says so."""
    record = {"format": FORMAT, "version": VERSION, **({"init_from": origin} if origin is not None else {})}
    with atomic_open(run / MARKER) as f:
        f.write((json.dumps(record) + "\n").encode("ascii"))


def read_marker(run: Path) -> dict:
    """The marker's record ({} when there is none or it is unreadable)."""
    try:
        record = json.loads((run / MARKER).read_bytes())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def lock(run: Path, hold: ExitStack | None) -> None:
    """Take RUN/.lock until `hold` closes (None: only check that no other process holds it);
    another process holding it is an LmtrainError with its pid."""
    with ExitStack() as now:
        stack = now if hold is None else hold
        stack.enter_context(exclusive(run / LOCK, f"run directory {run}"))
        stack.callback(forget_holder, run / LOCK)  # runs first, while the lock is still held


def forget_holder(path: Path) -> None:
    """Empty the lock file as its holder lets go, so that a run left alone reads the same after a
    refused or finished command as before it (only a killed holder leaves its pid there)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    finally:
        os.close(fd)  # another descriptor: closing it keeps the flock, which belongs to exclusive's


def protected_reason(path: Path, keep: list[Path]) -> str | None:
    """Why `--force` must not clear `path`, or None. `keep` are paths that must survive (the corpus,
    the cache): a directory holding one of them is refused."""
    real = path.resolve()
    if real == Path("/"):
        return "it is the root directory"
    if real == Path.home().resolve():
        return "it is the home directory"
    if Path.cwd().resolve().is_relative_to(real):
        return "it is the current directory" if Path.cwd().resolve() == real else "it holds the current directory"
    for kept in keep:
        if kept.resolve().is_relative_to(real):
            return f"it holds {kept}"
    return None


def check_replaceable(path: Path, keep: list[Path]) -> None:
    """The checks `--force` makes before it may clear an existing, non-empty `path`."""
    if path.is_symlink():
        raise LmtrainError(f"run directory {path} is a symbolic link (to {os.readlink(path)}): --force replaces "
                           "only a real directory; give the directory itself, or another --run-dir")
    reason = protected_reason(path, keep)
    if reason is not None:
        raise LmtrainError(f"--force will not clear {path}: {reason}; choose a directory of its own for the run")


def not_a_run(path: Path, force: bool) -> LmtrainError:
    return LmtrainError(f"run directory {path} already exists and is not empty, and it is not an lmtrain run "
                        f"directory (no {MARKER}, nor a config.toml with metrics.jsonl or a checkpoint): "
                        + ("--force replaces only lmtrain's runs; " if force else "") + "choose another --run-dir")


def already_a_run(path: Path) -> LmtrainError:
    return LmtrainError(f"run directory {path} already holds a run: continue it with "
                        f"`lmtrain train --resume {path}`, or pass --force to replace it")


def clear(run: Path) -> None:
    """Remove lmtrain's files from `run` but the lock (held) and the marker (it stays, so that a
    clear cut short still leaves a recognised run). Nothing else is touched."""
    for path in run_files(run):
        if path.name not in (LOCK, MARKER):
            path.unlink(missing_ok=True)
    board = run / "tensorboard"  # train.tensorboard's event files (lmtrain.training.tensorboard), and only those
    if board.is_dir() and not board.is_symlink():
        for path in board.glob("events.out.tfevents.*"):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # left where it holds anything else
            board.rmdir()


def create(path: Path, force: bool, keep: list[Path], hold: ExitStack) -> None:
    """Make `path` a fresh run directory, locked until `hold` closes: the marker written first.

    A missing or empty directory is used as it is. One that holds a run is refused without
    `force`; with it, the run's files are removed once the lock is held (check_replaceable says
    where it refuses). Anything else is refused. `keep`: the corpus and the cache (see
    protected_reason)."""
    if path.exists() and not path.is_dir():
        raise LmtrainError(f"run directory {path} exists and is not a directory")
    if path.is_dir() and not is_empty(path):
        if force:
            check_replaceable(path, keep)
        if not is_run_dir(path):
            raise not_a_run(path, force)
        if not force:
            raise already_a_run(path)
    elif force and path.is_symlink():
        check_replaceable(path, keep)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmtrainError(f"cannot create run directory {path}: {e.strerror}") from None
    lock(path, hold)
    if not is_empty(path) and not (force and is_run_dir(path)):  # another process got there between
        raise already_a_run(path) if is_run_dir(path) else not_a_run(path, force)
    check_run_files(path)
    try:
        write_marker(path)
        clear(path)
    except OSError as e:
        raise LmtrainError(f"cannot write to run directory {path}: {e.strerror}") from None
