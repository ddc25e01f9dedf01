"""Run directories are lmtrain's own (lmtrain.runs): `--force` removes only the files lmtrain
wrote, and only from a run; nothing is written through a link; one process at a time writes a run.

Each case: the exact command, exit code, the one `error:` line, and what is on disk afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import TINY_WORD, assert_one_error, cli, ok, private_cache_one_thread, sets, train_small_run, tree_bytes, write_corpus, write_small_corpus

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import Config, to_toml
from lmtrain.runs import LOCK, MARKER, RUN_FILES, is_run_dir
import lmtrain.training.setup

SETTINGS = [
    *TINY_WORD, "train.log_interval=4",
    "train.checkpoint_every=6", "train.max_steps=12",
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus, a finished run of 12 steps)."""
    return train_small_run(tmp_path_factory.mktemp("trained"), SETTINGS)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run to try things on."""
    return Path(shutil.copytree(trained[1], tmp_path / "run"))


def train_force(corpus: Path, run_dir, *extra: str):
    return cli("train", corpus, "--run-dir", run_dir, "--force", *sets(*SETTINGS, "train.max_steps=4"), *extra)


# --- --force clears only lmtrain's runs, only their files -----------------------------------------


def test_force_in_the_current_directory_keeps_the_users_files(trained, tmp_path, monkeypatch):
    """Issue 15, item 1: `--run-dir . --force` in a folder with the user's own config.toml, corpus
    and notes emptied it."""
    home = tmp_path / "work"
    write_small_corpus(home / "corpus")
    (home / "config.toml").write_text(to_toml(Config()))  # the user's own, a valid lmtrain config
    (home / "notes.md").write_text("my notes\n")
    monkeypatch.chdir(home)
    before = tree_bytes(home)
    assert_one_error(train_force(Path("corpus"), "."), "--force will not clear .", "it is the current directory")
    assert_one_error(cli("train", "corpus", "--run-dir", ".", *sets(*SETTINGS)), "run directory .",
                     "not an lmtrain run directory", "choose another --run-dir")
    assert tree_bytes(home) == before
    # even when the folder looks like a run (a config.toml and a metrics.jsonl), `.` is not cleared
    (home / "metrics.jsonl").write_text("{}\n")
    before = tree_bytes(home)
    assert_one_error(train_force(Path("corpus"), "."), "--force will not clear .", "it is the current directory")
    assert_one_error(train_force(Path("corpus"), home / "corpus" / ".."), "it is the current directory")
    assert tree_bytes(home) == before


def test_force_refuses_a_run_directory_holding_the_corpus(run, tmp_path):
    """Issue 15, item 1: `--run-dir proj --force` deleted proj/src and the corpus being trained on."""
    corpus = write_small_corpus(run / "data")
    (run / "src").mkdir()
    (run / "src" / "main.py").write_text("print('mine')\n")
    before = tree_bytes(run)
    assert_one_error(train_force(corpus, run), f"--force will not clear {run}", f"it holds {corpus}")
    assert_one_error(train_force(corpus / "train.txt", run), f"it holds {corpus / 'train.txt'}")
    assert tree_bytes(run) == before


def test_force_refuses_a_run_directory_holding_the_cache_or_being_home(trained, run, monkeypatch):
    before = tree_bytes(run)
    with monkeypatch.context() as m:
        m.setenv("LMTRAIN_CACHE", str(run / "cache"))
        assert_one_error(train_force(trained[0], run), f"--force will not clear {run}", f"it holds {run / 'cache'}")
    assert (run / "cache" / "tokenizers").is_dir()  # the cache, filled before the run directory was made, stays
    shutil.rmtree(run / "cache")
    monkeypatch.setenv("HOME", str(run))
    assert_one_error(train_force(trained[0], run), f"--force will not clear {run}", "it is the home directory")
    assert tree_bytes(run) == before


def test_force_replaces_only_the_runs_own_files(trained, run):
    (run / "notes.txt").write_text("keep me")
    (run / "plots").mkdir()
    (run / "plots" / "mine.png").write_bytes(b"png")
    (run / ".draft.part").write_text("the user's, though it ends in .part")
    (run / ".last.pt.1234abcd.part").write_bytes(b"a temporary a killed lmtrain left")
    (run / "report.md").write_text("an old report")
    old_last = (run / "last.pt").read_bytes()
    ok(train_force(trained[0], run))
    assert (run / "notes.txt").read_text() == "keep me"
    assert (run / "plots" / "mine.png").read_bytes() == b"png"
    assert (run / ".draft.part").read_text() == "the user's, though it ends in .part"
    assert not (run / ".last.pt.1234abcd.part").exists() and not (run / "report.md").exists()
    assert (run / "last.pt").read_bytes() != old_last and load_checkpoint(run / "last.pt")["progress"]["step"] == 4
    assert not (run / "last.prev.pt").exists() or load_checkpoint(run / "last.prev.pt")["progress"]["step"] <= 4
    assert json.loads((run / MARKER).read_text()) == {"format": "lmtrain-run", "version": 1}
    assert (run / LOCK).read_bytes() == b""  # the holder's pid goes with the lock
    assert {p.name for p in run.iterdir()} - set(RUN_FILES) == {"notes.txt", "plots", ".draft.part"}


def test_a_run_from_before_the_marker_is_recognised(trained, run):
    (run / MARKER).unlink()
    assert is_run_dir(run)
    before = tree_bytes(run)
    assert_one_error(cli("train", trained[0], "--run-dir", run, *sets(*SETTINGS)), "already holds a run", "--force")
    assert tree_bytes(run) == before
    ok(cli("train", "--resume", run, *sets("train.max_steps=14")))  # resuming it marks it
    assert (run / MARKER).is_file() and load_checkpoint(run / "last.pt")["progress"]["step"] == 14
    (run / MARKER).unlink()
    (run / "notes.txt").write_text("keep me")
    ok(train_force(trained[0], run))
    assert (run / MARKER).is_file() and (run / "notes.txt").read_text() == "keep me"


def test_force_refuses_a_directory_that_is_not_a_run(trained, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "config.toml").write_text("title = 'not lmtrain's'\n")
    (folder / "best.pt").write_bytes(b"someone else's")
    (folder / "src").mkdir()
    (folder / "src" / "a.py").write_text("x = 1\n")
    before = tree_bytes(folder)
    assert_one_error(train_force(trained[0], folder), f"run directory {folder} already exists and is not empty",
                     "not an lmtrain run directory", "--force replaces only lmtrain's runs")
    assert tree_bytes(folder) == before


def test_force_on_a_linked_run_directory_says_why_in_one_line(trained, run, tmp_path):
    link = tmp_path / "latest"
    link.symlink_to(run)
    before = tree_bytes(run)
    line = assert_one_error(train_force(trained[0], link), f"run directory {link} is a symbolic link (to {run})",
                            "give the directory itself")
    assert ": None" not in line
    assert tree_bytes(run) == before and link.is_symlink()


def test_an_empty_or_missing_directory_needs_no_force(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "run"):
        ok(cli("train", trained[0], "--run-dir", target, *sets(*SETTINGS, "train.max_steps=2")))
        assert (target / MARKER).is_file() and (target / "last.pt").is_file()


# --- no writes through links ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["metrics.jsonl", "timing.jsonl", "best.pt", "config.toml"])
def test_resume_refuses_a_run_file_that_is_a_link(run, tmp_path, name):
    """Issue 15, item 2: --resume truncated and appended to a metrics.jsonl linked to a file outside."""
    outside = tmp_path / f"outside-{name}"
    outside.write_bytes((run / name).read_bytes() + b'{"the user": "data"}\n')
    (run / name).unlink()
    (run / name).symlink_to(outside)
    outside_before, before = outside.read_bytes(), tree_bytes(run)
    assert_one_error(cli("train", "--resume", run, *sets("train.max_steps=24")),
                     f"{run / name} is a symbolic link", "lmtrain writes no file through a link")
    assert outside.read_bytes() == outside_before
    assert tree_bytes(run) == before  # last.pt, best.pt and the logs as they were
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 12


def test_force_refuses_a_run_file_that_is_a_link(trained, run, tmp_path):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("the user's\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    before = tree_bytes(run)
    assert_one_error(train_force(trained[0], run), f"{run / 'metrics.jsonl'} is a symbolic link")
    assert tree_bytes(run) == before and outside.read_text() == "the user's\n"


# --- one writer per run ---------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "LMTRAIN_COMPILE": "0"}


@contextmanager
def lock_held_by_another_process(run: Path):
    """A process holding RUN/.lock as `train` does, until the block ends."""
    code = ("import sys, time; from pathlib import Path; from lmtrain.locks import exclusive\n"
            "with exclusive(Path(sys.argv[1]) / '.lock', 'run'):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_is_refused_naming_the_holder(trained, run):
    """Issue 15, item 8: two --resume of one run both went ahead and interleaved their records."""
    with lock_held_by_another_process(run) as pid:
        before = tree_bytes(run)
        for result in (cli("train", "--resume", run, *sets("train.max_steps=24")), train_force(trained[0], run)):
            assert_one_error(result, f"run directory {run} is in use by another lmtrain process (pid {pid})")
        assert tree_bytes(run) == before
    ok(cli("train", "--resume", run, *sets("train.max_steps=14")))  # free again once the holder is gone


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "force"])
def test_a_killed_training_leaves_no_stale_lock(trained, run, fresh):
    """A real `train --resume` (or `train --force`) holds the lock while it trains; SIGKILL releases it (flock)."""
    endless = sets("train.max_steps=1000000", "train.epochs=1000000")
    command = ["train", str(trained[0]), "--run-dir", str(run), "--force", *sets(*SETTINGS), *endless] if fresh \
        else ["train", "--resume", str(run), *endless]
    if fresh:  # so that the logs and last.pt waited for below are the child's
        for name in ("metrics.jsonl", "last.pt", "last.prev.pt"):
            (run / name).unlink(missing_ok=True)
    logged = size(run / "metrics.jsonl")
    child = subprocess.Popen([sys.executable, "-m", "lmtrain.cli", *command], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=child_env())
    try:
        wait_for(lambda: child.poll() is not None or (
            (run / LOCK).read_text().strip() == str(child.pid) and size(run / "metrics.jsonl") > logged
            and (run / "last.pt").is_file()), 120, "the child to train")
        assert child.poll() is None, child.stderr.read().decode()
        for result in (cli("train", "--resume", run, *sets("train.max_steps=24")), train_force(trained[0], run)):
            assert_one_error(result, f"is in use by another lmtrain process (pid {child.pid})")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    step = load_checkpoint(run / "last.pt")["progress"]["step"]
    ok(cli("train", "--resume", run, *sets(f"train.max_steps={step + 2}")))
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == step + 2


# --- a full disk --------------------------------------------------------------------------------------


def test_a_full_disk_writing_config_toml_leaves_a_run_force_can_clear(trained, tmp_path, monkeypatch):
    real_open = lmtrain.training.setup.atomic_open

    @contextmanager
    def full_disk_for_config(path, *args, **kwargs):
        with real_open(path, *args, **kwargs) as f:
            if path.name == "config.toml":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            yield f

    run = tmp_path / "run"
    monkeypatch.setattr(lmtrain.training.setup, "atomic_open", full_disk_for_config)
    assert_one_error(cli("train", trained[0], "--run-dir", run, *sets(*SETTINGS)),
                     f"cannot write to run directory {run}", "No space left on device", "--force")
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == [MARKER, LOCK, "tokenizer.model"]  # nothing half-written
    assert is_run_dir(run)
    assert_one_error(cli("train", trained[0], "--run-dir", run, *sets(*SETTINGS)), "already holds a run", "--force")
    ok(train_force(trained[0], run))
    assert (run / "config.toml").is_file() and (run / "last.pt").is_file()


# --- synth ------------------------------------------------------------------------------------------


def test_synth_overwrites_a_corpus_only_with_force(tmp_path):
    out = tmp_path / "copy"
    ok(cli("synth", out, "--lines", 40, "--seed", 1))
    before = tree_bytes(out)
    assert_one_error(cli("synth", out, "--lines", 40, "--seed", 2),
                     f"{out} already holds train.txt, valid.txt, test.txt", "pass --force")
    assert tree_bytes(out) == before
    ok(cli("synth", out, "--lines", 40, "--seed", 2, "--force"))
    assert tree_bytes(out) != before and sorted(tree_bytes(out)) == ["test.txt", "train.txt", "valid.txt"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "valid.txt").write_text("the user's own split\n")
    assert_one_error(cli("synth", mine), f"{mine} already holds valid.txt")
    assert tree_bytes(mine) == {"valid.txt": b"the user's own split\n"}


# --- reproduce --force: the same mechanism ------------------------------------------------------------

TINY_REPRODUCTION = """
[tokenizer]
kind = "word"
vocab_size = 80
[model]
layers = 1
embedding_size = 8
hidden_size = 8
[train]
epochs = 1
batch_size = 4
bptt = 8
"""


def test_reproduce_force_keeps_foreign_files(tmp_path):
    write_corpus(tmp_path / "data" / "ptb", sizes=(120, 20, 20))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ptb-small.toml").write_text(TINY_REPRODUCTION)
    args = ["reproduce", "ptb-small", "--data", tmp_path / "data", "--config-dir", tmp_path / "configs",
            "--runs-dir", tmp_path / "runs", "--results-dir", tmp_path / "results"]
    run = tmp_path / "runs" / "reproduce-ptb-small"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("keep me")
    before = tree_bytes(run)
    assert_one_error(cli(*args, "--force"), f"run directory {run} already exists", "not an lmtrain run directory")
    assert tree_bytes(run) == before
    (run / "notes.txt").unlink()
    ok(cli(*args))
    (run / "notes.txt").write_text("keep me")
    first = (run / "best.pt").read_bytes()
    ok(cli(*args, "--force", "--set", "train.seed=2"))
    assert (run / "notes.txt").read_text() == "keep me" and (run / "best.pt").read_bytes() != first
