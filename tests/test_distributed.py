"""Training on several processes (lmtrain/training/distributed.py): two gloo ranks on the CPU against one process.

Dropout is 0 throughout: its masks are drawn per rank and cannot match one process' draws, so
only dropout-free runs can be compared number for number. Each rank runs cores // 2 torch threads
(1 on a 2-core machine); the single-process references run on 1 thread.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import tree_bytes, write_corpus
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.config import load_config
from lmtrain.model.kernels import kernels_enabled
from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.language_model import LanguageModel
from lmtrain.runtime import seed_everything
from lmtrain.text.tokens import TokenFile
from lmtrain.training import distributed
from lmtrain.training.loop import train

TINY = [
    "model.layers=1", "model.hidden_size=16", "model.embedding_size=16", "model.dropout=0",
    "tokenizer.vocab_size=60", "train.batch_size=4", "train.eval_batch_size=4", "train.bptt=8",
    "train.epochs=1", "train.max_steps=20", "train.log_interval=1",
]


def sets(*settings: str) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.fixture()
def one_thread(tmp_path, monkeypatch):
    """A private cache and working directory, torch on one thread (restored after)."""
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


# --- the command line: lmtrain train --nproc 2 ---------------------------------------------------


def test_two_processes_reproduce_one(one_thread, capfd):
    corpus = write_corpus(one_thread / "corpus")
    single = cli("train", corpus, "--run-dir", one_thread / "one", *sets(*TINY))
    assert single.exit_code == 0, single.output
    capfd.readouterr()

    two = cli("train", corpus, "--run-dir", one_thread / "two", "--nproc", 2, *sets(*TINY))
    out, err = capfd.readouterr()  # the ranks write to the real stdout and stderr
    assert two.exit_code == 0, err
    # only rank 0 talks: one summary line, one "done"
    assert err.count("done: valid ppl") == 1 and err.count("epoch   1 | step     20") == 1, err

    one, both = records(one_thread / "one"), records(one_thread / "two")
    # the same records, each once: rank 1 wrote nothing to metrics.jsonl
    assert [(r["kind"], r["step"]) for r in both] == [(r["kind"], r["step"]) for r in one]
    assert [r["step"] for r in both if r["kind"] == "train"] == list(range(1, 21))
    for a, b in zip(one, both):
        for key in ("loss", "train_loss", "valid_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    assert len(records(one_thread / "two", "timing.jsonl")) == len(both)
    # the same files and no leftovers (temporary .part files of two writers, say)
    assert sorted(p.name for p in (one_thread / "two").iterdir()) == sorted(p.name for p in (one_thread / "one").iterdir())

    # a failure on the main rank while preparing (the run exists): one line from rank 0, exit 2
    again = cli("train", corpus, "--run-dir", one_thread / "two", "--nproc", 2, *sets(*TINY))
    out, err = capfd.readouterr()
    assert again.exit_code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already holds a run" in errors[0], err
    assert "Traceback" not in err
    assert records(one_thread / "two") == both  # the run was left alone

    # its last.pt holds rank 0's share of the carried state: resuming it is refused before any change
    before = tree_bytes(one_thread / "two")
    resumed = cli("train", "--resume", one_thread / "two", *sets("train.max_steps=30"))
    assert resumed.exit_code == 2
    assert "written by a run of 2 processes" in resumed.stderr and "Traceback" not in resumed.stderr
    assert tree_bytes(one_thread / "two") == before


def test_batch_must_split_over_processes(one_thread, capfd):
    corpus = write_corpus(one_thread / "corpus")
    result = cli("train", corpus, "--run-dir", one_thread / "run", "--nproc", 2, *sets(*TINY, "train.batch_size=5"))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: train.batch_size 5 does not split into 2 equal shares of streams (use a multiple of 2, or another process count)"]
    assert not (one_thread / "run").exists()
    assert capfd.readouterr().err == ""  # nothing was started


@pytest.mark.parametrize("nproc,extra,message", [
    (0, [], "--nproc must be at least 1, got 0"),
    (2, ["train.device=cuda"], "--nproc 2 on CUDA needs 2 GPUs, this machine shows 1"),
])
def test_nproc_checks(one_thread, monkeypatch, nproc, extra, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as far as lmtrain can tell
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed.subprocess, "Popen", None)  # would fail loudly if anything started
    result = cli("train", one_thread, "--nproc", nproc, *sets(*TINY, *extra))
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_nproc_starts_torchrun_with_the_same_arguments(one_thread, monkeypatch):
    started = []

    class FakeTorchrun:
        def __init__(self, command, env):
            started.append((command, env))

        def wait(self):
            return 3

    monkeypatch.setattr(distributed.subprocess, "Popen", FakeTorchrun)
    corpus = one_thread / "corpus"
    result = cli("train", corpus, "--nproc", 2, "-o", "out", "--force", *sets("train.batch_size=8", "train.bptt=5"))
    assert result.exit_code == 3  # torchrun's exit code
    [(command, env)] = started
    assert command == [sys.executable, "-c", distributed.TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "lmtrain",
                       "train", str(corpus), "--set", "train.batch_size=8", "--set", "train.bptt=5", "--run-dir", "out",
                       "--force"]
    # the ranks import this same lmtrain
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(distributed.__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_worker(rank: int, port: int, local_ranks: list[int], log: Path) -> None:
    """One rank of len(local_ranks), with the LOCAL_RANK given: note when it ran main_first's block."""
    os.environ.update(WORLD_SIZE=str(len(local_ranks)), RANK=str(rank), LOCAL_RANK=str(local_ranks[rank]),
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.setup(torch.device("cpu"), batch_size=len(local_ranks))
    with distributed.main_first():
        with open(log, "a") as f:
            f.write(f"{rank}\n")
    distributed.teardown()
    distributed.leave(0)  # as lmtrain's own ranks end (distributed.leave: gloo at interpreter shutdown)


def test_preparation_runs_on_the_main_rank_then_once_per_machine_first(tmp_path):
    # ranks 0 and 1 share a machine (local ranks 0, 1); rank 2 is alone on another (local rank 0):
    # rank 2 fills its machine's cache before rank 1 reads the one rank 0 filled
    log = tmp_path / "order"
    mp.start_processes(stage_worker, args=(free_port(), [0, 1, 0], log), nprocs=3, start_method="spawn")
    assert log.read_text().split() == ["0", "2", "1"]


# --- the loop under DDP: two gloo ranks in this machine's processes ---------------------------


VOCAB = 50


def synthetic_data() -> dict[str, TokenFile]:
    rng = np.random.default_rng(0)
    return {split: TokenFile(rng.integers(2, VOCAB, n).astype(np.uint16), VOCAB, 0, 0, 0)
            for split, n in (("train", 1200), ("valid", 300))}


def train_once(settings: list[str], run_dir: Path) -> LanguageModel:
    config = load_config(None, [*TINY, "train.max_steps=12", *settings])
    seed_everything(config.train.seed)
    model = LanguageModel(config.model, VOCAB)
    run_dir.mkdir(parents=True, exist_ok=True)
    train(model, config, synthetic_data(), run_dir, {"corpus": "synthetic"})
    return model


CASES = {"fp32": [], "bf16": ["train.precision=bf16"]}


def rank_worker(rank: int, port: int, out: Path) -> None:
    """One of two ranks: train each case through lmtrain.training.loop.train, each rank given its own run
    directory, then once with DDP bypassed."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.setup(torch.device("cpu"), batch_size=4)
    result = {"fused_cross_entropy": kernels_enabled() and cpu_ops() is not None}
    for name, settings in CASES.items():
        model = train_once(settings, out / name / f"rank{rank}")
        result[name] = [p.detach().clone() for p in model.parameters()]
    # the control: the loop's forward without DDP's wrapper, so no gradient averaging
    plain = distributed.training_forward
    distributed.training_forward = lambda model, seed: distributed.WindowForward(model)
    try:
        train_once([], out / "bypass" / f"rank{rank}")
        result["bypass_error"] = None
    except RuntimeError as e:
        result["bypass_error"] = str(e)
    finally:
        distributed.training_forward = plain
    torch.save(result, out / f"rank{rank}.pt")
    distributed.teardown()
    distributed.leave(0)  # as lmtrain's own ranks end (distributed.leave: gloo at interpreter shutdown)


def test_ranks_stay_in_sync_and_match_one_process(one_thread):
    out = one_thread / "ranks"
    mp.start_processes(rank_worker, args=(free_port(), out), nprocs=2, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    if cpu_ops() is not None:
        assert ranks[0]["fused_cross_entropy"]  # the C++ cross-entropy ran under DDP

    for name, settings in CASES.items():
        # the same weights on both ranks, bit for bit: every step saw the same averaged gradients
        for a, b in zip(ranks[0][name], ranks[1][name]):
            assert torch.equal(a, b), name
        # and the same losses as one process with the whole batch; bf16 rounds the decoder's weight
        # gradient per rank (to 8 bits), so there the runs agree to that precision only
        train_once(settings, one_thread / "single" / name)
        single = records(one_thread / "single" / name)
        both = records(out / name / "rank0")
        assert not any((out / name / "rank1").iterdir())  # rank 1 wrote no log and no checkpoint
        assert [(r["kind"], r["step"]) for r in both] == [(r["kind"], r["step"]) for r in single]
        tolerance = 1e-5 if name == "fp32" else 1e-3
        for a, b in zip(single, both):
            for key in ("loss", "train_loss", "valid_loss"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=tolerance), (name, a["step"], key)

    # without DDP's forward the ranks drift apart, and the loop says so at the epoch's end
    assert "weights differ" in ranks[0]["bypass_error"] and "weights differ" in ranks[1]["bypass_error"]
