"""The C++ build's lock handling: a killed build's leftover lock must never hang a later load."""

import os
import threading
import time
from types import SimpleNamespace

from lmtrain.kernels.build import remove_stale_build_lock


def fake_loader(directory):
    """Stands in for torch.utils.cpp_extension: only the build directory is asked for."""
    return SimpleNamespace(_get_build_directory=lambda name, verbose: str(directory))


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    start = time.monotonic()
    remove_stale_build_lock(fake_loader(tmp_path), stale_after_s=300, poll_s=0.01)
    assert not lock.exists()
    assert time.monotonic() - start < 5


def test_a_live_build_is_waited_for_not_broken(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    seen = []
    # the "other build" finishes after 0.3 s; until then the lock must stay where it is
    def finish():
        time.sleep(0.3)
        seen.append(lock.exists())
        lock.unlink()
    other = threading.Thread(target=finish)
    start = time.monotonic()
    other.start()
    remove_stale_build_lock(fake_loader(tmp_path), stale_after_s=300, poll_s=0.01)
    other.join()
    assert seen == [True]
    assert time.monotonic() - start >= 0.3


def test_a_lock_that_outlives_any_build_is_cleared_while_waiting(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    start = time.monotonic()
    remove_stale_build_lock(fake_loader(tmp_path), stale_after_s=0.2, poll_s=0.01)
    assert not lock.exists()
    assert 0.15 <= time.monotonic() - start < 5


def test_no_lock_returns_at_once(tmp_path):
    start = time.monotonic()
    remove_stale_build_lock(fake_loader(tmp_path), stale_after_s=300, poll_s=0.01)
    assert time.monotonic() - start < 1
