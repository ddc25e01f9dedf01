"""Same config, seed and machine on the CPU: the same metrics.jsonl, byte for byte."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import write_small_corpus

from lmtrain.config import load_config
from lmtrain.training.loop import train
from lmtrain.training.setup import prepare_run

# every source of randomness a run has: init, dropout (fresh and locked), embedding dropout,
# weight drop, variable-length windows; and NT-ASGD's switch, which follows validation
SETTINGS = [
    "tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=2", "model.embedding_size=12",
    "model.hidden_size=16", "model.tie_weights=true", "model.locked_dropout=true", "model.dropout=0.3",
    "model.dropout_hidden=0.2", "model.embedding_dropout=0.1", "model.weight_drop=0.3", "train.batch_size=4",
    "train.bptt=12", "train.variable_bptt=true", "train.epochs=6", "train.optimizer=ntasgd", "train.nonmono=1",
    "train.lr_schedule=constant", "train.lr=8", "train.ar=1", "train.tar=1", "train.log_interval=5",
]


def run_once(corpus: Path, run_dir: Path, monkeypatch, seed: int = 5, extra: tuple[str, ...] = ()) -> bytes:
    monkeypatch.setenv("LMTRAIN_CACHE", str(run_dir.parent / "cache"))
    config = load_config(None, [*SETTINGS, f"train.seed={seed}", *extra])
    model, config, data, info = prepare_run(corpus, config, run_dir, force=False, default_run_dir=None, say=lambda line: None)
    info.pop("run_dir")
    train(model, config, data, run_dir, info)
    return (run_dir / "metrics.jsonl").read_bytes()


def test_same_seed_same_metrics(tmp_path, monkeypatch):
    corpus = write_small_corpus(tmp_path / "corpus")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = run_once(corpus, tmp_path / "a", monkeypatch)
        second = run_once(corpus, tmp_path / "b", monkeypatch)
        other_seed = run_once(corpus, tmp_path / "c", monkeypatch, seed=6)
    finally:
        torch.set_num_threads(threads)
    assert first == second
    assert first != other_seed
    assert first.count(b'"kind": "epoch"') == 6
    assert b'"averaging": true' in first  # the run did switch to averaging
