"""Numerical faults (lmtrain/training/loop.py): a step whose loss or gradient norm is not finite is
skipped and counted, too many in a row stop the run, and non-finite weights never replace a
good checkpoint. Faults are injected on chosen steps by wrapping the loop's own functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_WORD, assert_error_after_progress, private_cache_one_thread, write_small_corpus
from typer.testing import CliRunner

from lmtrain.checkpoint import load_checkpoint
from lmtrain.cli import app
from lmtrain.config import load_config
from lmtrain.model.language_model import LanguageModel
from lmtrain.training.distributed import WindowForward
from lmtrain.training.graphs import WindowRunner
from lmtrain.training.loop import make_optimizer, train_step, train_window
import lmtrain.training.loop

SETTINGS = [
    *TINY_WORD, "train.optimizer=adamw", "train.lr=0.01",
    "train.log_interval=4", "train.checkpoint_every=4", "train.max_steps=24",
]


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


def cli_train(corpus: Path, run: Path, *more: str):
    args = ["train", corpus, "--run-dir", run, *(a for s in (*SETTINGS, *more) for a in ("--set", s))]
    return CliRunner().invoke(app, [str(a) for a in args])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class Faults:
    """Counts the training steps (calls of the loop's cross_entropy) and makes the chosen ones
    (1-based) produce a NaN loss, or a NaN gradient, or NaN weights after the step."""

    def __init__(self, monkeypatch, loss=(), grad=(), weights=()):
        self.loss, self.grad, self.weights = set(loss), set(grad), set(weights)
        self.calls, self.optimizer_steps = 0, 0
        real_ce, real_norm, real_make = lmtrain.training.loop.cross_entropy, lmtrain.training.loop.gradient_norm, lmtrain.training.loop.make_optimizer

        def cross_entropy(logits, targets):
            self.calls += 1
            out = real_ce(logits, targets)
            return out * math.nan if self.calls in self.loss else out

        def gradient_norm(model, clip):
            if self.calls in self.grad:
                next(model.parameters()).grad.view(-1)[0] = math.nan
            return real_norm(model, clip)

        def make_optimizer(model, config):
            optimizer = real_make(model, config)
            real_step = optimizer.step

            def step():
                self.optimizer_steps += 1
                real_step()
                if self.calls in self.weights:
                    with torch.no_grad():
                        next(model.parameters()).view(-1)[0] = math.nan

            optimizer.step = step
            return optimizer

        monkeypatch.setattr(lmtrain.training.loop, "cross_entropy", cross_entropy)
        monkeypatch.setattr(lmtrain.training.loop, "gradient_norm", gradient_norm)
        monkeypatch.setattr(lmtrain.training.loop, "make_optimizer", make_optimizer)


def test_non_finite_steps_are_skipped_and_counted(corpus, tmp_path, monkeypatch):
    faults = Faults(monkeypatch, loss=(3, 10), grad=(6, 7))
    result = cli_train(corpus, tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert faults.calls == 24 and faults.optimizer_steps == 24 - 4  # no update on the four bad steps
    train = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert [(r["step"], r["bad_steps"]) for r in train] == [(4, 1), (8, 2), (12, 1), (16, 0), (20, 0), (24, 0)]
    assert all(math.isfinite(r["loss"]) for r in train)  # the mean is over the good steps only
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["progress"]["step"] == 24
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_too_many_bad_steps_in_a_row_stop_the_run(corpus, tmp_path, monkeypatch):
    Faults(monkeypatch, loss=range(10, 100))
    run = tmp_path / "run"
    result = cli_train(corpus, run, "train.max_bad_steps=3")
    assert_error_after_progress(result, "4 steps in a row up to step 13", "train.max_bad_steps = 3",
                                f"{run / 'last.pt'} holds the last good checkpoint")
    last = load_checkpoint(run / "last.pt")
    assert last["progress"]["step"] == 12  # steps 10-12 were skipped and counted, then saved as they were
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert [r["bad_steps"] for r in records(run) if r["kind"] == "train"] == [0, 0, 3]


def test_non_finite_weights_are_never_saved_over_a_good_checkpoint(corpus, tmp_path, monkeypatch):
    Faults(monkeypatch, weights=(6,))
    run = tmp_path / "run"
    result = cli_train(corpus, run)
    assert_error_after_progress(result, "weights are not finite at step 8", f"last good checkpoint {run / 'last.pt'}")
    kept = (run / "last.pt").read_bytes()
    last = load_checkpoint(run / "last.pt")
    assert last["progress"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert (run / "last.pt").read_bytes() == kept and not list(run.glob(".*.part"))


def test_a_skipped_step_changes_no_weight_and_carries_a_finite_state():
    config = load_config(None, SETTINGS)
    torch.manual_seed(0)
    model = LanguageModel(config.model, 50)
    optimizer = make_optimizer(model, config.train)
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), config.train, None, x, y, s),
                          list(model.parameters()), False)
    x, y = torch.randint(0, 50, (6, 4)), torch.randint(0, 50, (6, 4))
    before = [p.detach().clone() for p in model.parameters()]
    poisoned = [tuple(torch.full_like(t, math.nan) for t in layer) for layer in model.init_state(4)]
    loss, state = train_step(model, runner, optimizer, config.train, x, y, state=poisoned)
    assert loss is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(t).all() for layer in state for t in layer)  # zeros, not NaN, go on
    loss, state = train_step(model, runner, optimizer, config.train, x, y, state=state)
    assert loss is not None and math.isfinite(loss)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# as tests/test_resume.py: averaging starts within the first 140 steps
NTASGD = [
    "tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=2", "model.embedding_size=12",
    "model.hidden_size=16", "model.tie_weights=true", "model.dropout=0.3", "train.batch_size=4", "train.bptt=12",
    "train.epochs=12", "train.optimizer=ntasgd", "train.nonmono=1", "train.lr_schedule=constant", "train.lr=8",
    "train.ar=1", "train.tar=1", "train.log_interval=5", "train.checkpoint_every=0", "train.seed=5",
]


def test_a_skipped_step_is_not_averaged(corpus, tmp_path, monkeypatch):
    """NT-ASGD's average counts the steps it took in: the skipped ones are not among them."""
    total, bad = 150, (141, 144)
    Faults(monkeypatch, loss=bad)
    run = tmp_path / "run"
    args = ["train", corpus, "--run-dir", run, *(a for s in (*NTASGD, f"train.max_steps={total}") for a in ("--set", s))]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    ends = [r for r in records(run) if r["kind"] == "epoch"]
    first = next(k for k, r in enumerate(ends) if r["averaging"])
    started = ends[first - 1]["step"]  # the epoch end whose validation switched averaging on
    assert started < min(bad)
    average = load_checkpoint(run / "last.pt")["resume"]["average"]
    assert average["count"] == 1 + (total - started) - len(bad)
