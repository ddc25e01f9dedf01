"""lmtrain.evaluation.evaluate_run: `lmtrain evaluate` as a function, called without typer, gives
what the command prints."""

from __future__ import annotations

import json

import pytest
from helpers import cli, make_lines, ok, private_cache_one_thread, write_corpus, write_lines

from lmtrain.errors import LmtrainError
from lmtrain.evaluation import CacheSettings, EvaluateSettings, evaluate_run

SETTINGS = ["tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=1", "model.embedding_size=12",
            "model.hidden_size=16", "train.batch_size=4", "train.bptt=12", "train.max_steps=6", "train.device=cpu"]


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-run")
    corpus = write_corpus(root / "corpus", sizes=(150, 20, 20))
    ok(cli("train", corpus, "--run-dir", root / "run", *[a for s in SETTINGS for a in ("--set", s)]))
    return root / "run"


def test_a_split_scores_as_the_command_prints_it(run):
    warnings = []
    done = evaluate_run(run, None, EvaluateSettings(split="valid"), warnings.append)
    printed = json.loads(ok(cli("evaluate", run, "--split", "valid", "--json")).stdout)
    assert done.report == printed and done.report["split"] == "valid" and warnings == []
    assert list(done.results) == ["valid"] and done.results["valid"]["tokens"] == printed["tokens"] > 0


def test_files_and_the_cache_as_one_stream(run, tmp_path):
    files = [write_lines(tmp_path / f"{k}.txt", make_lines(8, k)) for k in (1, 2)]
    cache = CacheSettings(window=20, theta=0.5, lam=0.1)
    done = evaluate_run(run, files, EvaluateSettings(batch_size=1, cache=cache), print)
    printed = json.loads(ok(cli("evaluate", run, *files, "--batch-size", "1", "--cache", "--cache-window", "20",
                                "--cache-theta", "0.5", "--cache-lambda", "0.1", "--json")).stdout)
    assert done.report == printed
    assert [f["file"] for f in done.report["files"]] == [str(f) for f in files]
    assert done.settings == {"cache": {"window": 20, "theta": 0.5, "lam": 0.1}}


def test_a_bad_request_is_an_lmtrain_error(run, tmp_path):
    with pytest.raises(LmtrainError, match="file to evaluate not found"):
        evaluate_run(run, [tmp_path / "missing.txt"], EvaluateSettings(), print)
    one = write_lines(tmp_path / "one.txt", ["a b"])
    with pytest.raises(LmtrainError, match="--batch-size 1,000 is more than the"):
        evaluate_run(run, [one], EvaluateSettings(batch_size=1000), print)
