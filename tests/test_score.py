"""`lmtrain score` on cases a reader can check: per-token log-probs sum to the line's total, a
line's total is what the model gives when run on it here, --carry-state is evaluate --batch-size 1
of the file, the batch size changes nothing, empty lines, standard input, bad files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import TINY_WORD, assert_one_error, cli, ok, private_cache_one_thread, train_small_run, write_lines
from lmtrain.cli import app
from lmtrain.model import load_run
from lmtrain.text import EOS_ID

LINES = ["The cat sees a dog.", "", "A bird finds the river quickly near the old house.", "zebra unknown words here"]


@pytest.fixture(scope="module", autouse=True)
def _isolated(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _, run = train_small_run(tmp_path_factory.mktemp("score"), TINY_WORD + ["train.max_steps=20", "train.epochs=1"])
    return run


@pytest.fixture
def lines_file(tmp_path):
    return write_lines(tmp_path / "lines.txt", LINES)


def records(result) -> list[dict]:
    return [json.loads(line) for line in ok(result).stdout.splitlines()]


def independent_log_prob(run, line: str) -> tuple[float, int]:
    """The line's log-probability as the model gives it, run here in one forward pass: <eos>, then
    the line's ids, predicting the ids and the line's end."""
    loaded = load_run(run, torch.device("cpu"))
    ids = loaded.tokenizer.encode_lines([line]).tolist()
    x = torch.tensor([EOS_ID] + ids[:-1]).view(-1, 1)
    with torch.no_grad():
        logits, _ = loaded.model(x, loaded.model.init_state(1))
    log_probs = torch.log_softmax(logits.view(len(ids), -1).double(), -1)
    return log_probs[torch.arange(len(ids)), torch.tensor(ids)].sum().item(), len(ids)


def test_a_line_scores_what_the_model_gives_it(run, lines_file):
    scored = records(cli("score", run, lines_file, "--json"))
    assert [r["text"] for r in scored] == LINES and [r["line"] for r in scored] == [1, 2, 3, 4]
    for r in scored:
        log_prob, tokens = independent_log_prob(run, r["text"])
        assert r["tokens"] == tokens and r["log_prob"] == pytest.approx(log_prob, rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(-log_prob / tokens), rel=1e-5)
    assert scored[1]["tokens"] == 1  # an empty line is its end alone


def test_per_token_log_probs_sum_to_the_line_and_per_file_to_the_lines(run, lines_file):
    by_line = records(cli("score", run, lines_file, "--json"))
    by_token = records(cli("score", run, lines_file, "--json", "--per", "token"))
    for r in by_line:
        mine = [t for t in by_token if t["line"] == r["line"]]
        assert [t["position"] for t in mine] == list(range(r["tokens"])) and mine[-1]["id"] == EOS_ID
        assert sum(t["log_prob"] for t in mine) == pytest.approx(r["log_prob"], rel=1e-9)
    [whole] = records(cli("score", run, lines_file, "--json", "--per", "file"))
    assert whole["lines"] == len(LINES) and whole["tokens"] == sum(r["tokens"] for r in by_line)
    assert whole["log_prob"] == pytest.approx(sum(r["log_prob"] for r in by_line), rel=1e-9)
    assert whole["ppl"] == pytest.approx(math.exp(-whole["log_prob"] / whole["tokens"]))


def test_the_batch_size_changes_nothing(run, lines_file):
    together = records(cli("score", run, lines_file, "--json"))
    alone = records(cli("score", run, lines_file, "--json", "--batch-size", "1"))
    assert [r["log_prob"] for r in together] == pytest.approx([r["log_prob"] for r in alone], rel=1e-6)


def test_carry_state_is_evaluate_of_the_file_as_one_stream(run, tmp_path):
    corpus_test = run.parent / "corpus" / "test.txt"
    for batch in ("1", "7", "32"):  # the state carries across batches of lines
        [whole] = records(cli("score", run, corpus_test, "--json", "--per", "file", "--carry-state", "--batch-size", batch))
        report = json.loads(ok(cli("evaluate", run, corpus_test, "--batch-size", "1", "--json")).stdout)
        assert whole["tokens"] == report["tokens"] and -whole["log_prob"] == pytest.approx(report["nll_sum"], rel=1e-6)
    fresh = records(cli("score", run, corpus_test, "--json", "--per", "file"))[0]
    assert fresh["log_prob"] != pytest.approx(whole["log_prob"], rel=1e-6)  # context across lines matters


def test_standard_input_and_plain_output(run, lines_file):
    piped = CliRunner().invoke(app, ["score", str(run), "-", "--json"], input=lines_file.read_bytes())
    from_file = records(cli("score", run, lines_file, "--json"))
    assert [dict(r, file="") for r in records(piped)] == [dict(r, file="") for r in from_file]
    assert {r["file"] for r in records(piped)} == {"-"}
    plain = [line.split("\t") for line in ok(CliRunner().invoke(app, ["score", str(run)], input="the cat\r\n\n")).stdout.splitlines()]
    assert [(tokens, text) for _, tokens, _, text in plain] == [("3", "the cat"), ("1", "")]  # no file: standard input
    log_prob, tokens = independent_log_prob(run, "the cat")
    assert float(plain[0][0]) == pytest.approx(log_prob, abs=1e-4) and float(plain[0][2]) == pytest.approx(math.exp(-log_prob / 3), abs=1e-3)


def test_several_files_and_an_empty_one(run, lines_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    out = records(cli("score", run, lines_file, empty, lines_file, "--json", "--per", "file"))
    assert [r["file"] for r in out] == [str(lines_file), str(empty), str(lines_file)]
    assert out[1] == {"file": str(empty), "lines": 0, "tokens": 0, "log_prob": 0.0, "ppl": None}
    assert out[0] == out[2]


def test_bad_input_is_one_error_line(run, lines_file, tmp_path):
    assert_one_error(cli("score", run, tmp_path / "missing.txt"), "file to score not found", "missing.txt")
    assert_one_error(cli("score", run, tmp_path), "is a directory")
    assert_one_error(cli("score", run, "-", "-"), "standard input")
    assert_one_error(cli("score", run, lines_file, "--per", "word"), "--per must be line, token or file")
    assert_one_error(cli("score", run, lines_file, "--batch-size", "0"), "--batch-size")
    assert_one_error(cli("score", tmp_path / "norun", lines_file), "run not found")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbad \xff byte\n")
    error = assert_one_error(cli("score", run, bad), str(bad), "line 2", "0xff")
    assert "--encoding-errors replace" in error
    replaced = records(cli("score", run, bad, "--json", "--encoding-errors", "replace"))
    assert replaced[1]["text"] == "bad \ufffd byte"


def test_a_byte_order_mark_and_crlf_are_read_as_evaluation_reads_them(run, tmp_path):
    plain = write_lines(tmp_path / "plain.txt", LINES)
    marked = tmp_path / "marked.txt"
    marked.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(LINES).encode() + b"\r\n")
    a, b = records(cli("score", run, plain, "--json")), records(cli("score", run, marked, "--json"))
    assert [r["text"] for r in a] == [r["text"] for r in b] and np.allclose([r["log_prob"] for r in a], [r["log_prob"] for r in b])
