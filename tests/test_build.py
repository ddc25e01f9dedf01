"""The C++ build: its key covers every input, a damaged library is rebuilt, a build in progress
is waited for with one line, and a killed build's leftover lock never hangs a later load."""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from lmtrain.locks import exclusive
from lmtrain.model.kernels import build
from lmtrain.model.kernels.build import build_key, damage, holding_build_lock, load_rebuilding_once

FILES = {"a.cpp": b"int f() { return 1; }", "h.h": b"#define X 1"}
FLAGS = ["-O3", "-march=native"]


def key(files=FILES, flags=FLAGS, torch_version="2.5.0", cpu="x86_64: avx2 sse4_2"):
    return build_key(files, flags, torch_version, cpu)


def test_the_key_is_a_pure_function_of_its_inputs():
    assert key() == key()
    assert key() != key(files={**FILES, "a.cpp": b"int f() { return 2; }"})  # a source's content
    assert key() != key(files={**FILES, "h.h": b"#define X 2"})  # a header's content
    assert key() != key(flags=["-O2", "-march=native"])
    assert key() != key(torch_version="2.6.0")
    assert key() != key(cpu="x86_64: avx512f avx2 sse4_2")
    # the names are part of it: content moved from one file to another is another build
    assert key() != key(files={"a.cpp": b"int f() { return 1; }#define X 1", "h.h": b""})


def test_a_source_replaced_by_an_older_one_changes_the_key(tmp_path, monkeypatch):
    """torch's loader goes by file times; the key goes by content, whatever the times say."""
    for name in build.SOURCES + build.HEADERS:
        (tmp_path / name).write_bytes(f"// {name}\n".encode())
    before = build.current_key(tmp_path)
    source = tmp_path / build.SOURCES[0]
    source.write_bytes(b"// a test build that halves the loss\n")
    old = time.time() - 86400
    os.utime(source, (old, old))
    changed = build.current_key(tmp_path)
    assert changed != before
    monkeypatch.setattr(build, "cpu_features", lambda: "x86_64: another cpu")
    assert build.current_key(tmp_path) != changed


def test_the_cpu_features_come_from_the_cpu():
    features = build.cpu_features()
    assert features.startswith(build.platform.machine())
    if Path("/proc/cpuinfo").is_file() and build.platform.machine() == "x86_64":
        assert " sse2" in features  # every x86-64 CPU has it


def elf_library(tmp_path) -> Path:
    """A copy of a real ELF shared library (the Python extension that holds `_struct`, or any)."""
    import _ctypes

    library = tmp_path / "lib.so"
    shutil.copyfile(_ctypes.__file__, library)
    return library


def test_a_library_cut_short_is_seen_before_loading(tmp_path):
    library = elf_library(tmp_path)
    assert damage(library) is None
    data = library.read_bytes()
    for cut in (10, 64, len(data) // 2, len(data) - 1):
        library.write_bytes(data[:cut])
        assert "cut short" in damage(library), cut
    library.write_bytes(b"garbage" * 100)
    assert damage(library) == "not a 64-bit ELF file"
    assert damage(tmp_path / "not built yet.so") is None


def fake_build(library: Path, built: list, good: bytes):
    """A loader standing in for torch's: builds `library` (with `good`) when it is missing, and
    refuses to load anything but `good`, as dlopen refuses a damaged file."""
    def load():
        if not library.exists():
            library.write_bytes(good)
            built.append("built")
        if library.read_bytes() != good:
            raise OSError(8, "invalid ELF header")
        built.append("loaded")
    return load


def test_a_damaged_library_is_removed_and_built_again_once(tmp_path):
    good = elf_library(tmp_path).read_bytes()
    library = tmp_path / "lmtrain_cpu_x.so"
    for damaged in (good[: len(good) // 3], good[:64] + b"\0" * (len(good) - 64)):
        library.write_bytes(damaged)
        events, lines = [], []
        load_rebuilding_once(fake_build(library, events, good), library, lambda: events.append("forgot"), lines.append)
        assert library.read_bytes() == good
        assert events == ["forgot", "built", "loaded"]
        assert len(lines) == 1 and lines[0].startswith(f"warning: the compiled kernels {library} are damaged (")
        assert lines[0].endswith("); building them again")


def test_a_whole_library_is_loaded_without_a_rebuild(tmp_path):
    good = elf_library(tmp_path).read_bytes()
    library = tmp_path / "lmtrain_cpu_x.so"
    library.write_bytes(good)
    events, lines = [], []
    load_rebuilding_once(fake_build(library, events, good), library, lambda: events.append("forgot"), lines.append)
    assert events == ["loaded"] and lines == []


def test_a_library_that_stays_broken_fails_after_one_rebuild(tmp_path):
    library = tmp_path / "lmtrain_cpu_x.so"
    library.write_bytes(b"garbage")
    calls = []

    def load():
        calls.append(1)
        library.write_bytes(b"garbage")
        raise OSError(8, "invalid ELF header")

    with pytest.raises(OSError):
        load_rebuilding_once(load, library, lambda: None, lambda line: None)
    assert len(calls) == 1  # not a loop: the caller falls back to the Python code with its warning


def test_a_build_in_progress_is_waited_for_with_one_line(tmp_path):
    held, release = threading.Event(), threading.Event()

    def other_build():
        with exclusive(tmp_path / "lmtrain.lock", "a build"):
            held.set()
            release.wait(5)

    other = threading.Thread(target=other_build)
    other.start()
    held.wait(5)
    lines = []
    threading.Timer(0.3, release.set).start()
    start = time.monotonic()
    with holding_build_lock(tmp_path, say=lines.append):
        waited = time.monotonic() - start
    other.join()
    assert waited >= 0.25
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"note: waiting for the C++ kernels' build in {tmp_path}, in use by another "
                               f"lmtrain process (pid {os.getpid()})")


def test_the_wait_line_reaches_stderr(tmp_path, capsys):
    with exclusive(tmp_path / "lmtrain.lock", "a build"):
        done = []

        def wait_for_it():
            with holding_build_lock(tmp_path):
                done.append(1)

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.3)
        assert not done
    waiter.join(5)
    assert done
    assert capsys.readouterr().err.count("note: waiting for the C++ kernels' build") == 1


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    """torch's own lock file, under our lock: no lmtrain build holds it, so it is a leftover."""
    (tmp_path / "lock").touch()
    start = time.monotonic()
    with holding_build_lock(tmp_path, say=lambda line: pytest.fail(line)):
        assert not (tmp_path / "lock").exists()
    assert time.monotonic() - start < 1


def test_no_lock_enters_at_once(tmp_path):
    start = time.monotonic()
    with holding_build_lock(tmp_path, say=lambda line: pytest.fail(line)):
        pass
    assert time.monotonic() - start < 1


def test_the_ops_load_under_the_keyed_name():
    """The library's name carries the key; the ops still register as torch.ops.lmtrain."""
    if os.environ.get("LMTRAIN_COMPILE", "1") == "0":
        pytest.skip("LMTRAIN_COMPILE=0")
    ops = build.cpu_ops()
    if ops is None:
        pytest.skip("no compiler here")
    name = f"{build.EXTENSION}_{build.current_key(Path(build.__file__).parent / 'cpu')}"
    assert any(name in str(path) for path in build.torch.ops.loaded_libraries), build.torch.ops.loaded_libraries
    assert callable(ops.lstm_forward_loop) and callable(ops.pack_panels)
