"""`lmtrain reproduce` and `lmtrain results` on a tiny stand-in for a published setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_corpus
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.config import load_config
from lmtrain.model.language_model import LanguageModel
from lmtrain.tools.reproduce import PUBLISHED, results_table

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

TINY_CONFIG = """
[tokenizer]
kind = "word"
vocab_size = 80
[model]
layers = 1
embedding_size = 8
hidden_size = 8
[train]
epochs = 2
batch_size = 4
bptt = 8
"""


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_reproduce_writes_a_result_and_the_table_shows_it(tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    write_corpus(tmp_path / "data" / "ptb", sizes=(120, 20, 20))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ptb-small.toml").write_text(TINY_CONFIG)
    args = ["--data", tmp_path / "data", "--config-dir", tmp_path / "configs", "--runs-dir", tmp_path / "runs",
            "--results-dir", tmp_path / "results"]
    result = cli("reproduce", "ptb-small", *args, "--set", "train.seed=3")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "results" / "ptb-small.json").read_text())
    assert saved["name"] == "ptb-small" and saved["epochs"] == 2 and saved["overrides"] == ["train.seed=3"]
    assert saved["config"]["train"]["seed"] == 3
    assert 1 < saved["valid_ppl"] < 80 and 1 < saved["test_ppl"] < 80
    assert saved["published"] == {"valid_ppl": 120.7, "test_ppl": 114.5, "source": PUBLISHED["ptb-small"].source}
    for key in ("parameters", "device", "torch"):
        assert saved[key]
    assert saved["train_minutes"] >= 0
    run = tmp_path / "runs" / "reproduce-ptb-small"
    assert (run / "best.pt").is_file()
    # the table: our numbers for the one result, "not yet run" for every other setup
    table = cli("results", "--results-dir", tmp_path / "results").stdout.strip().splitlines()
    assert len(table) == 2 + len(PUBLISHED)
    row = next(line for line in table if line.startswith("| ptb-small |"))
    assert f"{saved['valid_ppl']:.1f} / {saved['test_ppl']:.1f}" in row and "120.7 / 114.5" in row
    assert sum("not yet run" in line for line in table) == len(PUBLISHED) - 1

    # a second reproduction keeps the first one's run unless forced
    (run / "best.pt").write_bytes(b"the first run's checkpoint")
    again = cli("reproduce", "ptb-small", *args)
    assert again.exit_code == 2 and "holds an earlier reproduction of ptb-small: pass --force" in again.stderr
    assert (run / "best.pt").read_bytes() == b"the first run's checkpoint" and "Traceback" not in again.output
    assert json.loads((tmp_path / "results" / "ptb-small.json").read_text()) == saved
    forced = cli("reproduce", "ptb-small", *args, "--force")
    assert forced.exit_code == 0, forced.output
    assert (run / "best.pt").read_bytes() != b"the first run's checkpoint"
    assert json.loads((tmp_path / "results" / "ptb-small.json").read_text())["overrides"] == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["reproduce", "ptb-huge"], "unknown reproduction 'ptb-huge'"),
        (["reproduce", "ptb-small", "--data", "/nonexistent"], "/nonexistent/ptb not found"),
        (["reproduce", "ptb-small", "--config-dir", "/nonexistent"], "config /nonexistent/ptb-small.toml not found"),
    ],
)
def test_reproduce_errors(args, message, tmp_path):
    result = cli(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr and "Traceback" not in result.output


def test_a_broken_result_file_is_a_clean_error(tmp_path):
    (tmp_path / "ptb-small.json").write_text("{not json")
    result = cli("results", "--results-dir", tmp_path)
    assert result.exit_code == 2 and "not a reproduction result" in result.stderr
    assert "not yet run" in results_table(tmp_path / "elsewhere")


def test_every_published_setup_has_a_config_that_loads():
    for name in PUBLISHED:
        load_config(CONFIGS / f"{name}.toml")


def test_configs_say_what_the_papers_say():
    small, medium, large = (load_config(CONFIGS / f"ptb-{n}.toml") for n in ("small", "medium", "large"))
    assert (small.model.hidden_size, small.model.dropout, small.train.epochs, small.train.bptt) == (200, 0.0, 13, 20)
    assert (medium.model.hidden_size, medium.model.dropout, medium.train.epochs, medium.train.lr_decay,
            medium.train.lr_decay_start, medium.model.init_range, medium.train.bptt) == (650, 0.5, 39, 1.2, 6, 0.05, 35)
    assert (large.model.hidden_size, large.model.dropout, large.train.epochs, large.train.lr_decay,
            large.train.lr_decay_start, large.model.init_range, large.train.clip) == (1500, 0.65, 55, 1.15, 14, 0.04, 10.0)
    for name, dropouts, batch in (("ptb-awd", (0.4, 0.25, 0.4), 20), ("wt2-awd", (0.65, 0.2, 0.4), 80)):
        awd = load_config(CONFIGS / f"{name}.toml")
        m, t = awd.model, awd.train
        assert (m.layers, m.embedding_size, m.hidden_size, m.tie_weights, m.locked_dropout) == (3, 400, 1150, True, True)
        assert m.dropouts() == dropouts and (m.embedding_dropout, m.weight_drop) == (0.1, 0.5)
        assert (t.bptt, t.variable_bptt, t.lr, t.clip, t.ar, t.tar, t.weight_decay, t.optimizer, t.batch_size) == (
            70, True, 30.0, 0.25, 2.0, 1.0, 1.2e-6, "ntasgd", batch)
    best = load_config(CONFIGS / "ptb-small-best.toml")
    assert best.model.layers == 2 and best.train.max_minutes <= 45
    budget = sum(p.numel() for p in LanguageModel(small.model, 10_000).parameters())
    assert budget < 4.7e6 and sum(p.numel() for p in LanguageModel(best.model, 10_000).parameters()) <= budget


def test_a_character_level_setup_is_shown_in_bits_per_character(tmp_path):
    published = PUBLISHED["ptb-char-small"]
    assert published.unit == "bpc" and load_config(CONFIGS / "ptb-char-small.toml").tokenizer.kind == "char"
    result = {"valid_ppl": 2.71, "test_ppl": 2.65, "valid_bpc": 1.4391, "test_bpc": 1.4057, "parameters": 3_300_000,
              "epochs": 5, "train_minutes": 29.0, "device": "a CPU", "threads": 2}
    (tmp_path / "ptb-char-small.json").write_text(json.dumps(result))
    (row,) = [line for line in results_table(tmp_path).splitlines() if line.startswith("| ptb-char-small ")]
    assert "| — / 1.27 bpc | 1.439 / 1.406 bpc | 3.30 M |" in row
