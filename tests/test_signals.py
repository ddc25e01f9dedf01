"""SIGTERM and SIGKILL against real `lmtrain train` processes (SIGINT, which can be sent in-process,
is in tests/test_resume.py).

One run, stopped three times: SIGTERM (the step ends, last.pt is written, exit 143), then SIGKILL
twice at seeded random moments, checkpoint writes included (there is one every 3 steps): last.pt
is always a whole checkpoint, and the run resumed from it ends where an uninterrupted run ends,
bit for bit. Each process trains a tiny model on one thread; most of the time is process start.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_small_corpus
from typer.testing import CliRunner

from lmtrain.checkpoint import load_checkpoint
from lmtrain.cli import app

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=1", "model.embedding_size=12",
    "model.hidden_size=16", "model.dropout=0.2", "model.weight_drop=0.2", "train.batch_size=4", "train.bptt=12",
    "train.variable_bptt=true", "train.epochs=12", "train.log_interval=5", "train.checkpoint_every=3",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The corpus, the environment of every process, and an uninterrupted run to compare with,
    trained in-process (one torch thread, as OMP_NUM_THREADS=1 gives the processes) to save a
    process start."""
    root = tmp_path_factory.mktemp("signals")
    corpus = write_small_corpus(root / "corpus")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMTRAIN_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    reference = root / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LMTRAIN_CACHE", env["LMTRAIN_CACHE"])
            args = ["train", corpus, "--run-dir", reference, *(a for s in SETTINGS for a in ("--set", s))]
            result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.stderr
    return corpus, env, reference


def start(corpus: Path | None, run: Path, env: dict) -> subprocess.Popen:
    """`lmtrain train` (a new run with `corpus`, else --resume), stderr to RUN.stderr."""
    args = ["--resume", run] if corpus is None else [corpus, "--run-dir", run, *(a for s in SETTINGS for a in ("--set", s))]
    log = open(f"{run}.stderr", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *map(str, args)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    finally:
        log.close()


def checkpoint_id(run: Path):
    try:
        st = (run / "last.pt").stat()
        return st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def wait_for_a_new_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the process has written a checkpoint (so it is training, past its start-up) or ended."""
    before, deadline = checkpoint_id(run), time.monotonic() + timeout
    while checkpoint_id(run) == before and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.005)


def assert_same_as(run: Path, reference: Path) -> None:
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    ours, theirs = load_checkpoint(run / "last.pt")["model"], load_checkpoint(reference / "last.pt")["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not list(run.glob(".*.part"))  # no temporary file left behind


def test_sigterm_then_sigkills_then_resume_ends_as_one_run(setup, tmp_path):
    corpus, env, reference = setup
    run = tmp_path / "run"
    proc = start(corpus, run, env)
    wait_for_a_new_checkpoint(run, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    stderr = Path(f"{run}.stderr").read_text()
    assert "SIGTERM: stopped after step" in stderr and f"lmtrain train --resume {run}" in stderr
    stopped = load_checkpoint(run / "last.pt")["progress"]
    assert 0 < stopped["step"] < load_checkpoint(reference / "last.pt")["progress"]["step"]
    assert stopped["at"] == "step"  # the exact position, not an epoch end

    moments = random.Random(6)
    kills = 0
    for _ in range(2):
        proc = start(None, run, env)
        wait_for_a_new_checkpoint(run, proc)
        time.sleep(moments.uniform(0, 0.3))
        proc.kill()
        if proc.wait(timeout=60) != -signal.SIGKILL:
            break  # it had already finished
        kills += 1
        load_checkpoint(run / "last.pt")  # a whole checkpoint, whatever the moment
    assert kills == 2
    finished = load_checkpoint(run / "last.pt")["progress"]["step"] == load_checkpoint(reference / "last.pt")["progress"]["step"]
    if not finished:  # a kill that lands after the final checkpoint leaves a finished run, which --resume refuses
        assert start(None, run, env).wait(timeout=120) == 0
    assert_same_as(run, reference)
