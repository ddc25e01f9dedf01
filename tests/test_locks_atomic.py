"""lmtrain.locks (one writer per lock file) and lmtrain.atomic (no write through a link)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmtrain.atomic import atomic_open, open_regular
from lmtrain.errors import LmtrainError
from lmtrain.locks import exclusive

HOLD = "import sys, time; from pathlib import Path; from lmtrain.locks import exclusive\n" \
       "with exclusive(Path(sys.argv[1]), 'thing'):\n    print('held', flush=True); time.sleep(60)\n"


def test_second_holder_refused_with_pid_and_lock_freed_when_holder_is_killed(tmp_path):
    lock = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LmtrainError, match=f"thing is in use by another lmtrain process \\(pid {holder.pid}\\)"):
            with exclusive(lock, "thing"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(lock, "thing"):  # SIGKILL left no stale lock
        assert lock.read_text().strip() == str(os.getpid())


def test_lock_file_that_is_a_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / ".lock").symlink_to(target)
    with pytest.raises(LmtrainError, match="symbolic link"):
        with exclusive(tmp_path / ".lock", "thing"):
            pass
    assert target.read_text() == "keep"


def test_atomic_open_and_open_regular_refuse_links(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"user data\n")
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(outside)
    for opener in (lambda: open_regular(link, "ab"), lambda: open_regular(link, "r+b"), lambda: atomic_open(link).__enter__()):
        with pytest.raises(LmtrainError, match="metrics.jsonl is a symbolic link"):
            opener()
    assert outside.read_bytes() == b"user data\n" and link.is_symlink()
    assert list(tmp_path.glob("*.part")) == [] and list(tmp_path.glob(".*.part")) == []


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "timing.jsonl"
    os.mkfifo(fifo)
    for mode in ("r+b", "ab"):
        with pytest.raises(LmtrainError, match="not a regular file"):
            open_regular(fifo, mode)


def test_open_regular_appends_to_a_regular_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open_regular(path, "ab") as f:
        f.write(b"one\n")
    with open_regular(path, "ab") as f:
        f.write(b"two\n")
    assert path.read_bytes() == b"one\ntwo\n"
