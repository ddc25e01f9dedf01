"""`lmtrain train NEW_CORPUS --init-from RUN`: the new run starts at RUN's weights exactly, with
RUN's tokenizer (the <unk> share reported) and config, a fresh optimizer and schedule, and a record
of where it came from; keys that would change the model's shape are refused, naming them."""

from __future__ import annotations

import json
from contextlib import ExitStack

import numpy as np
import pytest
import torch

from helpers import (TINY_WORD, assert_one_error, cli, ok, private_cache_one_thread, sets, train_small_run,
                     write_corpus, write_lines)
from lmtrain.checkpoint import load_checkpoint
from lmtrain.model import read_saved
from lmtrain.text import UNK_ID, encode_in_memory
from lmtrain.training import default_run_dir, finetune_config, prepare_run


@pytest.fixture(scope="module", autouse=True)
def _isolated(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """RUN, and a new corpus with words RUN's vocabulary has never seen."""
    root = tmp_path_factory.mktemp("finetune")
    _, run = train_small_run(root, TINY_WORD + ["train.max_steps=20", "train.epochs=1", "model.dropout=0.1"])
    new = write_corpus(root / "new", sizes=(120, 20, 20))
    lines = (new / "train.txt").read_text().splitlines() + ["zebra giraffe walks the okapi."] * 10
    write_lines(new / "train.txt", lines)
    return run, new


def test_the_model_starts_exactly_at_runs_weights(trained, tmp_path):
    run, new = trained
    config, saved = finetune_config(run, None, ["train.lr=0.5"])
    with ExitStack() as hold:
        model, _, data, info = prepare_run(new, config, tmp_path / "ft", force=False, default_run_dir=default_run_dir,
                                        say=lambda line: None, hold=hold, init_from=(run, saved))
    theirs = load_checkpoint(run / "best.pt")["model"]
    mine = model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert info["tokenizer"]["model"] == saved.tokenizer.model_proto and info["init_from"]["run"] == str(run.resolve())
    assert config.train.lr == 0.5 and config.model.dropout == 0.1  # RUN's config, then the overrides


def test_a_fine_tuned_run_records_its_origin_and_trains_afresh(trained, tmp_path):
    run, new = trained
    result = ok(cli("train", new, "--init-from", run, "--run-dir", tmp_path / "ft", *sets("train.max_steps=6", "train.lr=0.5")))
    # the <unk> share, counted here with RUN's tokenizer
    tokenizer = read_saved(run).tokenizer
    counts = [(int(np.count_nonzero(t == UNK_ID)), len(t)) for t in
              (encode_in_memory(tokenizer, (new / f"{s}.txt").read_text().splitlines()).tokens for s in ("train", "valid", "test"))]
    share = sum(u for u, _ in counts) / sum(n for _, n in counts)
    assert share > 0.01
    note = next(line for line in result.stderr.splitlines() if line.startswith("vocabulary:"))
    assert f"{share:.2%} of the new corpus' tokens are <unk>" in note and f"train {counts[0][0] / counts[0][1]:.2%}" in note
    marker = json.loads((tmp_path / "ft" / ".lmtrain-run").read_text())
    origin = marker["init_from"]
    assert origin["run"] == str(run.resolve()) and origin["checkpoint"] == str((run / "best.pt").resolve())
    assert origin["step"] == load_checkpoint(run / "best.pt")["progress"]["step"]
    assert origin["unknown_share"]["all"] == pytest.approx(share)
    last = load_checkpoint(tmp_path / "ft" / "last.pt")
    assert last["init_from"] == origin and last["progress"]["step"] == 6  # a fresh count of steps
    assert last["tokenizer"]["model"] == tokenizer.model_proto and last["vocab_size"] == tokenizer.vocab_size
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["lr"] == 0.5  # the schedule starts again at train.lr
    assert "dropout = 0.1" in (tmp_path / "ft" / "config.toml").read_text()
    ok(cli("train", "--resume", tmp_path / "ft", *sets("train.max_steps=8")))
    assert load_checkpoint(tmp_path / "ft" / "last.pt")["init_from"] == origin  # resuming keeps it
    ok(cli("evaluate", tmp_path / "ft", "--json"))


def test_shape_keys_that_differ_from_runs_are_refused_naming_them(trained, tmp_path):
    run, new = trained
    error = assert_one_error(cli("train", new, "--init-from", run, "--run-dir", tmp_path / "a",
                                 *sets("model.hidden_size=32", "model.cell=gru", "train.lr=0.5")),
                             "model.hidden_size = 32 (RUN has 16)", "model.cell = 'gru' (RUN has 'lstm')")
    assert "train.lr" not in error
    config = tmp_path / "c.toml"
    config.write_text("[tokenizer]\nkind = \"bpe\"\n[model]\nlayers = 1\n")  # layers as RUN's: no conflict
    assert_one_error(cli("train", new, "--init-from", run, "--config", config, "--run-dir", tmp_path / "b"),
                     "tokenizer.kind = 'bpe' (RUN has 'word')")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_other_mistakes_are_one_line(trained, tmp_path):
    run, new = trained
    assert_one_error(cli("train", new, "--init-from", tmp_path / "missing", "--run-dir", tmp_path / "a"), "run not found")
    assert_one_error(cli("train", new, "--init-from", run, "--run-dir", run), "a directory of its own")
    assert_one_error(cli("train", "--resume", run, "--init-from", run), "--init-from")
    assert (run / "best.pt").is_file()
