"""Exact resume: a run stopped and continued ends with the same weights, bit for bit, and the same
metrics.jsonl, byte for byte, as a run that never stopped (lmtrain/training/resume.py, lmtrain/training/loop.py).

Everything runs in-process through the CLI with tiny models; SIGTERM and SIGKILL, which need
real processes, are in tests/test_signals.py.
"""

from __future__ import annotations

import json
import os
import signal
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import cli, ok, private_cache_one_thread, write_small_corpus

from lmtrain.checkpoint import load_checkpoint, save_checkpoint
import lmtrain.cli.train
from lmtrain.progress import QuietProgress
from lmtrain.training.resume import restore_best

# every source of randomness (init, dropout fresh and locked, embedding dropout, weight drop,
# variable-length windows) and NT-ASGD's switch to averaging, which follows validation
SETTINGS = [
    "tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=2", "model.embedding_size=12",
    "model.hidden_size=16", "model.tie_weights=true", "model.locked_dropout=true", "model.dropout=0.3",
    "model.dropout_hidden=0.2", "model.embedding_dropout=0.1", "model.weight_drop=0.3", "train.batch_size=4",
    "train.bptt=12", "train.variable_bptt=true", "train.epochs=12", "train.optimizer=ntasgd", "train.nonmono=1",
    "train.lr_schedule=constant", "train.lr=8", "train.ar=1", "train.tar=1", "train.log_interval=5",
    "train.checkpoint_every=7", "train.seed=5",
]
# AdamW's moments and the plateau schedule, whose lr a mid-epoch stop's validation must not cut
ADAMW_PLATEAU = [
    "tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=1", "model.embedding_size=12",
    "model.hidden_size=16", "model.dropout=0.2", "train.batch_size=4", "train.bptt=12", "train.epochs=8",
    "train.optimizer=adamw", "train.lr=0.1", "train.lr_schedule=plateau", "train.lr_decay=2",
    "train.log_interval=4", "train.checkpoint_every=5",
]
TOTAL = 240  # mid-epoch: the run ends with a 'stop' record


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield




def sets(settings: list[str], *more: str) -> list[str]:
    return [arg for item in (*settings, *more) for arg in ("--set", item)]


def train_new(corpus: Path, run: Path, settings: list[str], max_steps: int):
    return ok(cli("train", corpus, "--run-dir", run, *sets(settings, f"train.max_steps={max_steps}")))


def resume(run: Path, max_steps: int):
    return ok(cli("train", "--resume", run, "--set", f"train.max_steps={max_steps}"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """The same metrics.jsonl bytes and, in last.pt and best.pt, the same tensors: the weights to
    evaluate, the trained weights under NT-ASGD's average, and the optimizer's state."""
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    for name in ("last.pt", "best.pt"):
        ours, theirs = load_checkpoint(run / name), load_checkpoint(reference / name)
        assert ours["model"].keys() == theirs["model"].keys()
        for key in theirs["model"]:
            assert torch.equal(ours["model"][key], theirs["model"][key]), (name, key)
        assert ours["progress"] == theirs["progress"]
    ours, theirs = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    for key, tensor in (theirs["resume"]["trained"] or {}).items():
        assert torch.equal(ours["resume"]["trained"][key], tensor), key
    for index, state in theirs["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(ours["optimizer"]["state"][index][key]), torch.as_tensor(value)), key


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One uninterrupted run of TOTAL steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train_new(corpus, run, SETTINGS, TOTAL)
    return run


def test_stopped_and_resumed_three_times_equals_one_run(corpus, reference, tmp_path):
    ends = {r["step"]: r for r in records(reference) if r["kind"] == "epoch"}
    stops = [min(ends), 70, 140]  # an epoch's end; mid-epoch; mid-epoch while averaging
    assert 70 not in ends and 140 not in ends and TOTAL not in ends
    assert not ends[max(s for s in ends if s < 70)]["averaging"]
    assert ends[max(s for s in ends if s < 140)]["averaging"]
    run = tmp_path / "run"
    train_new(corpus, run, SETTINGS, stops[0])
    for max_steps in (*stops[1:], TOTAL):
        result = resume(run, max_steps)
        assert f"resuming {run} from last.pt" in result.stderr
    assert_same_run(run, reference)
    assert tomllib.loads((run / "config.toml").read_text())["train"]["max_steps"] == TOTAL
    assert sum(r["kind"] == "stop" for r in records(run)) == 1  # the stops before the last were taken back
    assert not list(run.glob(".*.part"))


def test_adamw_and_the_plateau_schedule_resume_exactly(corpus, tmp_path):
    train_new(corpus, tmp_path / "reference", ADAMW_PLATEAU, 150)
    run = tmp_path / "run"
    train_new(corpus, run, ADAMW_PLATEAU, 84)
    assert records(run)[-1]["kind"] == "stop"
    resume(run, 150)
    assert_same_run(run, tmp_path / "reference")
    lrs = [r["lr"] for r in records(run) if r["kind"] == "epoch"]
    assert len(set(lrs)) > 1  # the plateau schedule did cut the lr along the way


class SignalAfter(QuietProgress):
    """A progress display that sends this process SIGINT at step `at` (`times` times): Ctrl-C
    arriving mid-run, while the command's handlers are installed."""

    def __init__(self, at: int, times: int = 1):
        self.at, self.times, self.steps = at, times, 0

    def step(self, loss, tokens_per_s, lr):
        self.steps += 1
        if self.steps == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


def test_sigint_stops_after_the_step_with_a_checkpoint(corpus, reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(lmtrain.cli.train, "TerminalProgress", lambda: SignalAfter(at=61))
    before = signal.getsignal(signal.SIGINT)
    result = cli("train", corpus, "--run-dir", run, *sets(SETTINGS, f"train.max_steps={TOTAL}"))
    assert result.exit_code == 130, result.stderr
    assert "SIGINT: stopped after step 61" in result.stderr
    assert f"lmtrain train --resume {run}" in result.stderr
    stopped = load_checkpoint(run / "last.pt")
    assert stopped["progress"]["step"] == 61 and stopped["progress"]["at"] == "step"
    assert signal.getsignal(signal.SIGINT) is before  # the command put its handler back
    monkeypatch.undo()
    ok(cli("train", "--resume", run))
    assert_same_run(run, reference)


def test_a_second_sigint_aborts_at_once_leaving_the_last_checkpoint(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(lmtrain.cli.train, "TerminalProgress", lambda: SignalAfter(at=40, times=2))
    result = cli("train", corpus, "--run-dir", run, *sets(SETTINGS, f"train.max_steps={TOTAL}"))
    assert result.exit_code == 130 and "aborted" in result.stderr
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 35  # the last one before: every 7 steps
    assert not list(run.glob(".*.part"))


def fake_checkpoint(path: Path, step: int, at: str) -> None:
    save_checkpoint(path, {"progress": {"step": step, "at": at}})


@pytest.mark.parametrize(
    "best, kept, expected",
    [
        ((40, "epoch"), (20, "epoch"), 40),  # best.pt from before the checkpoint: kept
        ((50, "stop"), (20, "epoch"), 20),  # written by a train.max_steps stop: the one before comes back
        ((60, "epoch"), (20, "epoch"), 20),  # an epoch after the checkpoint (killed before last.pt): the same
        ((50, "stop"), None, None),  # nothing earlier to go back to: removed
    ],
)
def test_restore_best_goes_back_to_the_checkpoint(tmp_path, best, kept, expected):
    if kept:
        fake_checkpoint(tmp_path / "best.pt", *kept)
    fake_checkpoint(tmp_path / "best.pt", *best)  # the first one becomes best.prev.pt
    restore_best(tmp_path, 50, lambda line: None)
    if expected is None:
        assert not (tmp_path / "best.pt").exists()
    else:
        assert load_checkpoint(tmp_path / "best.pt")["progress"]["step"] == expected
