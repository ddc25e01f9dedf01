"""Bad input found outside the first matrix (issue 15, items 4, 10 and 11): each gives one
`error: ...` line and exit 2 (or works, where the fix makes it work), no traceback, and leaves the
files as they were; what can be known before training is refused before it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    TINY_WORD,
    assert_one_error,
    cli,
    make_lines,
    ok,
    private_cache_one_thread,
    sets,
    train_small_run,
    tree_bytes,
    write_lines,
    write_small_corpus,
)

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import ModelConfig
from lmtrain.model.language_model import LanguageModel, count_parameters
from lmtrain.training.preflight import parameter_count

ROOT = Path(__file__).resolve().parents[1]
BOM = b"\xef\xbb\xbf"
SETTINGS = [
    *TINY_WORD, "train.log_interval=4",
    "train.checkpoint_every=6", "train.max_steps=12", "train.device=cpu",
]


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
    return Path(shutil.copytree(trained[1], tmp_path / "run"))


def corpus_with(tmp_path: Path, split: str, data: bytes) -> Path:
    corpus = write_small_corpus(tmp_path / "corpus")
    (corpus / f"{split}.txt").write_bytes(data)
    return corpus


def deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


# --- item 4: splits that cannot be trained on or validated, refused before training -------------


@pytest.mark.parametrize("data, fragment", [(BOM, "only a UTF-8 byte order mark"),
                                            (BOM + b" \n\n", "byte order mark and whitespace")],
                         ids=["bom", "bom-whitespace"])
def test_train_refuses_a_valid_split_of_only_a_byte_order_mark(tmp_path, data, fragment):
    """It used to train every step and crash at validation, with no best.pt."""
    corpus = corpus_with(tmp_path, "valid", data)
    assert_one_error(cli("train", corpus, "--run-dir", tmp_path / "run", *sets(*SETTINGS)), "valid.txt", fragment)
    assert not (tmp_path / "run").exists()


def test_a_byte_order_mark_before_text_is_fine(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    (corpus / "valid.txt").write_bytes(BOM + (corpus / "valid.txt").read_bytes())
    ok(cli("train", corpus, "--run-dir", tmp_path / "run", *sets(*SETTINGS)))
    assert (tmp_path / "run" / "best.pt").is_file()


def test_one_file_corpus_whose_split_is_only_a_byte_order_mark(tmp_path):
    """The 90/5/5 split of one file: its first part (train) is the mark and blank lines."""
    corpus = tmp_path / "one.txt"
    corpus.write_bytes(BOM + b"\n" * 50 + "\n".join(make_lines(3, 0)).encode() + b"\n")
    assert_one_error(cli("train", corpus, "--run-dir", tmp_path / "run", *sets(*SETTINGS)), "train part", "only whitespace")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data, fragment", [(BOM, "only a UTF-8 byte order mark"), (b"", "is empty")], ids=["bom", "empty"])
def test_evaluate_refuses_a_file_with_no_text(trained, tmp_path, data, fragment):
    """`evaluate RUN bom.txt` was a ZeroDivisionError."""
    text = tmp_path / "t.txt"
    text.write_bytes(data)
    assert_one_error(cli("evaluate", trained[1], text), str(text), fragment)


def test_eval_batch_size_above_the_validation_tokens_is_refused_before_training(trained, tmp_path):
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS, "train.eval_batch_size=100000"))
    assert_one_error(result, "train.eval_batch_size 100,000", "tokens of the validation split")
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_for_memory_is_refused_before_the_corpus_is_read(tmp_path):
    """2 x 200,000 units: 640 GB of weights alone. Refused in well under a second, before
    anything is built or read (the corpus does not even exist)."""
    started = time.perf_counter()
    result = cli("train", tmp_path / "no-such-corpus", "--run-dir", tmp_path / "run",
                 *sets(*SETTINGS, "model.hidden_size=200000", "model.layers=2"))
    assert_one_error(result, "parameters", "GiB", "model.hidden_size")
    assert time.perf_counter() - started < 5
    assert list(tmp_path.iterdir()) == []


def test_a_training_window_too_large_for_memory(trained, tmp_path):
    result = cli("train", trained[0], "--run-dir", tmp_path / "run",
                 *sets(*SETTINGS, "train.batch_size=1000000", "train.bptt=100000"))
    assert_one_error(result, "train.batch_size 1,000,000 x train.bptt 100,000", "GiB")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", [dict(), dict(cell="gru", layers=3), dict(cell="peephole,gru", tie_weights=True),
                                   dict(cell="slstm"), dict(cell="rnn,coupled")])
def test_the_memory_estimate_counts_the_parameters_of_the_model_exactly(model):
    config = ModelConfig(hidden_size=20, embedding_size=12, **model)
    assert parameter_count(config, 50) == count_parameters(LanguageModel(config, 50))


# --- item 10: configs nested too deeply or too large --------------------------------------------


def test_a_toml_file_nested_100000_deep(trained, tmp_path):
    config = tmp_path / "deep.toml"
    config.write_text(f"[train]\nlr = {deep()}\n")
    result = cli("train", trained[0], "--config", config, "--run-dir", tmp_path / "run")
    assert_one_error(result, str(config), "nested too deeply")
    assert not (tmp_path / "run").exists()


def test_a_set_value_nested_100000_deep(trained, tmp_path):
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", "--set", f"model.hidden_size={deep()}")
    assert_one_error(result, "--set model.hidden_size", "nested too deeply")
    assert not (tmp_path / "run").exists()


def test_a_huge_value_echoed_back_is_cut_to_one_short_line(trained, tmp_path):
    """A text key takes the brackets as text; the error names it without printing 200 kB."""
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", "--set", f"model.cell={deep()}")
    assert_one_error(result, "config key 'model.cell' must be one of", "characters left out")
    assert len(result.stderr) < 1000
    assert not (tmp_path / "run").exists()


def test_resume_with_a_hand_edited_config_toml_nested_100000_deep(run):
    (run / "config.toml").write_text(f"[model]\nhidden_size = {deep()}\n")
    before = tree_bytes(run)
    assert_one_error(cli("train", "--resume", run, *sets("train.max_steps=24")), "config.toml", "nested too deeply")
    assert tree_bytes(run) == before


ABSURD = {
    "hidden-2**63-1": ("model.hidden_size", 2**63 - 1),
    "layers": ("model.layers", 10**6),
    "embedding": ("model.embedding_size", 10**9),
    "vocab": ("tokenizer.vocab_size", 10**12),
    "batch": ("train.batch_size", 2**62),
    "eval-batch": ("train.eval_batch_size", 10**10),
    "bptt": ("train.bptt", 2**40),
    "seed-beyond-int64": ("train.seed", 99999999999999999999999),
    "steps-beyond-int64": ("train.max_steps", 2**64),
}


@pytest.mark.parametrize("key, value", ABSURD.values(), ids=ABSURD.keys())
def test_absurd_sizes_on_the_command_line(trained, tmp_path, key, value):
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS, f"{key}={value}"))
    assert_one_error(result, key, "must be at most")
    assert not (tmp_path / "run").exists()


def test_an_absurd_size_in_a_config_file_names_the_file_and_key(trained, tmp_path):
    config = tmp_path / "big.toml"
    config.write_text(f"[model]\nhidden_size = {2**63 - 1}\n")
    result = cli("train", trained[0], "--config", config, "--run-dir", tmp_path / "run")
    assert_one_error(result, str(config), "model.hidden_size", "must be at most")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item", ["train.lr=inf", "train.lr=nan", "train.clip=inf", "train.weight_decay=nan",
                                  "train.lr_decay=inf", "model.dropout=nan", "model.init_range=-inf",
                                  "train.max_minutes=inf"])
def test_non_finite_floats_are_refused(trained, tmp_path, item):
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS, item))
    assert_one_error(result, item.partition("=")[0], "finite")
    assert not (tmp_path / "run").exists()


def test_non_finite_floats_in_a_config_file(trained, tmp_path):
    config = tmp_path / "inf.toml"
    config.write_text("[train]\nlr = inf\n")
    assert_one_error(cli("train", trained[0], "--config", config, "--run-dir", tmp_path / "run"),
                     str(config), "train.lr", "finite")
    assert not (tmp_path / "run").exists()


# --- item 10: torchrun's environment set by hand ------------------------------------------------


def test_world_size_1_without_torchrun_trains_as_one_process(trained, tmp_path, monkeypatch):
    """It was a KeyError: LOCAL_RANK."""
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    ok(cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS)))
    assert (tmp_path / "run" / "best.pt").is_file()


def test_world_size_2_without_the_rest_of_torchruns_environment(trained, tmp_path, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS))
    assert_one_error(result, "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "--nproc")
    assert not (tmp_path / "run").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_whose_peers_never_come_stops_after_the_rendezvous_timeout(trained, tmp_path, monkeypatch):
    """WORLD_SIZE=2 and one process: it waited an hour; now LMTRAIN_RENDEZVOUS_TIMEOUT seconds."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "LMTRAIN_RENDEZVOUS_TIMEOUT": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = time.perf_counter()
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS))
    assert_one_error(result, "did not meet", "within 1 s", "LMTRAIN_RENDEZVOUS_TIMEOUT")
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "run").exists()


def test_a_bad_rendezvous_timeout(trained, tmp_path, monkeypatch):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "LMTRAIN_RENDEZVOUS_TIMEOUT": "inf"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert_one_error(cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS)),
                     "LMTRAIN_RENDEZVOUS_TIMEOUT", "'inf'")


# --- item 10: report on odd records ---------------------------------------------------------------


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_report_on_a_record_with_valid_loss_null(run):
    rows = records(run)
    stop = next(r for r in rows if r["kind"] in ("epoch", "stop"))
    stop.update(valid_loss=None, valid_ppl=None, lr="fast")
    del stop["step"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = ok(cli("report", run, "--no-plot"))
    assert "Traceback" not in result.output and "| — | — |" in result.stdout
    assert "| best valid ppl | — |" in (run / "report.md").read_text()


@pytest.mark.parametrize("line, fragment", [("[1, 2]", "not a JSON object"), (deep(50_000), "nested too deeply")],
                         ids=["list", "deep"])
def test_report_on_a_line_that_is_no_record(run, line, fragment):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n" + json.dumps(records(run)[-1]) + "\n")
    assert_one_error(cli("report", run, "--no-plot"), "metrics.jsonl, line", fragment)
    assert not (run / "report.md").exists()


# --- item 11: evaluate notices a changed corpus ------------------------------------------------


def test_checkpoints_record_the_digest_of_each_split(trained):
    digests = load_checkpoint(trained[1] / "best.pt")["corpus_digests"]
    assert sorted(digests) == ["test", "train", "valid"] and all(len(d) == 64 for d in digests.values())


def test_evaluate_warns_when_the_split_changed_since_training(tmp_path):
    corpus = write_lines(tmp_path / "one.txt", make_lines(300, 0))
    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*SETTINGS)))
    assert "warning" not in ok(cli("evaluate", run)).stderr
    with open(corpus, "a") as f:  # the test split moves onto lines that were trained on
        f.write("".join(line + "\n" for line in make_lines(100, 1)))
    result = ok(cli("evaluate", run))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "test split" in warnings[0] and "changed" in warnings[0], result.stderr
    assert result.stdout.startswith("test: ")  # still scored


# --- item 11: SIGTERM before training, the build outside the training clock ----------------------


def test_sigterm_before_training_is_an_interrupt(tmp_path):
    """SIGTERM while the tokenizer trains or the corpus is encoded: one line, exit 143, no run
    directory and no temporary file left in the cache."""
    corpus = write_lines(tmp_path / "big.txt", make_lines(60_000, 3))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1",
           "LMTRAIN_COMPILE": "0"}
    args = [corpus, "--run-dir", tmp_path / "run", *sets("tokenizer.kind=bpe", "tokenizer.vocab_size=300",
                                                         "model.hidden_size=16", "train.max_steps=2")]
    proc = subprocess.Popen([sys.executable, "-m", "lmtrain", "train", *map(str, args)], env=env,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert line.startswith("corpus: "), line  # read; the tokenizer is training now
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    stderr = line + proc.stderr.read()
    assert "Traceback" not in stderr and "SIGTERM: interrupted before training started" in stderr, stderr
    assert not (tmp_path / "run").exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]


def test_the_one_time_build_counts_against_the_budget_but_not_the_numbers(trained, tmp_path, monkeypatch):
    """A build of 3 s (faked) before a run of a second or so: timing.jsonl's elapsed_s counts it (the
    budget of train.max_minutes is wall-clock time from the command's start), metrics.jsonl does not."""
    from lmtrain.model.kernels import build

    monkeypatch.setenv("LMTRAIN_COMPILE", "0")  # every other caller: the Python code, no real build
    ok(cli("train", trained[0], "--run-dir", tmp_path / "reference", *sets(*SETTINGS)))
    calls = []

    def slow_first_build():
        if not calls:
            time.sleep(3)
        calls.append(1)

    monkeypatch.setattr(build, "cpu_ops", slow_first_build)
    ok(cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS)))
    assert calls
    timing = [json.loads(line) for line in (tmp_path / "run" / "timing.jsonl").read_text().splitlines()]
    assert timing and timing[0]["elapsed_s"] >= 3
    # the seeded numbers do not depend on it
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == (tmp_path / "reference" / "metrics.jsonl").read_bytes()
