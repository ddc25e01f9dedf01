"""The Python API as a user imports it (`import lmtrain`), against the CLI's numbers and text on a
tiny run that the API trains: evaluate --json, generate --seed, score --json."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import lmtrain
from helpers import TINY_WORD, cli, ok, private_cache_one_thread, write_lines, write_small_corpus

OVERRIDES = {**dict(item.split("=") for item in TINY_WORD), "train.max_steps": 20, "train.epochs": 1,
             "train.log_interval": 5}
TEXT = "The cat sees a dog.\nA bird finds the river quickly."


@pytest.fixture(scope="module", autouse=True)
def _isolated(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    corpus = write_small_corpus(root / "corpus")
    return corpus, lmtrain.train(corpus, overrides=OVERRIDES, run_dir=root / "run")


def test_importing_lmtrain_loads_neither_torch_nor_the_api():
    code = "import sys, lmtrain; print('torch' in sys.modules, 'lmtrain.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert lmtrain.load is lmtrain.api.load and "load" in dir(lmtrain)


def test_train_writes_the_run_the_cli_would_and_says_nothing(tmp_path, capfd):
    corpus = write_small_corpus(tmp_path / "corpus")
    seen = []
    run = lmtrain.train(corpus, overrides=OVERRIDES, run_dir=tmp_path / "api", progress=seen.append)
    assert capfd.readouterr() == ("", "")
    ok(cli("train", corpus, "--run-dir", tmp_path / "cli", *[a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]))
    assert (tmp_path / "api" / "metrics.jsonl").read_bytes() == (tmp_path / "cli" / "metrics.jsonl").read_bytes()
    last = json.loads((tmp_path / "api" / "metrics.jsonl").read_text().splitlines()[-1])
    assert run.record["valid_ppl"] == last["valid_ppl"] == run.valid_ppl and run.record["step"] == 20
    assert run.run_dir == tmp_path / "api" and run.config.train.max_steps == 20 and run.init_from is None
    assert seen and seen[-1]["kind"] == "stop" and seen[-1]["valid_ppl"] == run.valid_ppl  # each validation's record


def test_load_gives_the_model_the_tokenizer_and_the_config(trained):
    _, run = trained
    lm = lmtrain.load(run.run_dir, device="cpu")
    assert lm.path == run.run_dir / "best.pt" and lm.device.type == "cpu"
    assert lm.config == run.config and not lm.model.training
    assert lm.tokenizer.decode(lm.tokenizer.encode_lines(["the cat"]).tolist()) == " the cat\n"
    assert lmtrain.load(run.run_dir / "best.pt").config == lm.config


def test_perplexity_and_metrics_are_evaluate_json_of_that_text(trained, tmp_path):
    _, run = trained
    lm = run.load()
    path = write_lines(tmp_path / "text.txt", TEXT.split("\n"))
    for batch in (1, 2):
        report = json.loads(ok(cli("evaluate", run.run_dir, path, "--batch-size", batch, "--json")).stdout)
        mine = lm.metrics(TEXT, batch_size=batch)
        assert {k: mine[k] for k in ("tokens", "words", "bytes", "chars")} == {k: report[k] for k in ("tokens", "words", "bytes", "chars")}
        assert mine["ppl"] == pytest.approx(report["ppl"], rel=1e-6)
        assert lm.perplexity(TEXT, batch_size=batch) == mine["ppl"]
    assert lm.perplexity(TEXT + "\n") == lm.perplexity(TEXT.replace("\n", "\r\n"))  # a final line end adds nothing


def test_evaluate_is_evaluate_json(trained, tmp_path):
    corpus, run = trained
    assert lmtrain.evaluate(run) == pytest.approx(json.loads(ok(cli("evaluate", run.run_dir, "--json")).stdout))
    path = write_lines(tmp_path / "text.txt", TEXT.split("\n"))
    mine = lmtrain.evaluate(run.run_dir, [path], batch_size=1)
    theirs = json.loads(ok(cli("evaluate", run.run_dir, path, "--batch-size", "1", "--json")).stdout)
    assert mine["files"][0]["file"] == theirs["files"][0]["file"] and mine["nll_sum"] == pytest.approx(theirs["nll_sum"])
    assert lmtrain.evaluate(run, split="valid", cache=True)["cache"] == {"window": 500, "theta": 1.0, "lam": 0.1}


def test_generate_is_the_cli_text_with_the_same_seed(trained):
    _, run = trained
    lm = run.load()
    for prompt, seed, more in (("The cat", 3, {}), ("", 11, {"temperature": 0.7, "top_k": 5}), ("A dog", 5, {"temperature": 0.0})):
        text = lm.generate(prompt, max_tokens=25, seed=seed, **more)
        flags = [a for k, v in more.items() for a in (f"--{k.replace('_', '-')}", v)]
        printed = ok(cli("generate", run.run_dir, "--prompt", prompt, "--max-tokens", 25, "--seed", seed, *flags)).stdout
        assert printed == prompt + text + "\n"
        assert "".join(lm.generate(prompt, max_tokens=25, seed=seed, stream=True, **more)) == text
    assert "\n" not in lm.generate("The", max_tokens=40, seed=2, until_eos=True)


def test_score_is_score_json(trained, tmp_path):
    _, run = trained
    lm = run.load()
    lines = ["The cat sees a dog.", "", "A bird finds the river quickly."]
    path = write_lines(tmp_path / "lines.txt", lines)
    printed = [json.loads(line) for line in ok(cli("score", run.run_dir, path, "--json")).stdout.splitlines()]
    scored = lm.score(lines)
    assert [s.text for s in scored] == [r["text"] for r in printed] == lines
    assert [s.tokens for s in scored] == [r["tokens"] for r in printed]
    assert [s.log_prob for s in scored] == pytest.approx([r["log_prob"] for r in printed], rel=1e-6)
    assert scored[1].tokens == 1 and math.isclose(scored[0].ppl, math.exp(-scored[0].log_prob / scored[0].tokens))
    assert lm.score(lines[0])[0].log_prob == pytest.approx(scored[0].log_prob, rel=1e-6)
    # a text of several lines is those lines in one stream: evaluate of a file of them
    two = lm.score(TEXT)[0]
    assert -two.log_prob == pytest.approx(lm.metrics(TEXT)["nll_sum"], rel=1e-6)


def test_problems_are_lmtrain_errors_not_exits(trained, tmp_path):
    corpus, run = trained
    lm = run.load()
    with pytest.raises(lmtrain.LmtrainError, match="run not found"):
        lmtrain.load(tmp_path / "missing")
    with pytest.raises(lmtrain.LmtrainError, match="unknown config key 'train.nope'"):
        lmtrain.train(corpus, overrides={"train.nope": 1}, run_dir=tmp_path / "x")
    with pytest.raises(lmtrain.LmtrainError, match="section.key"):
        lmtrain.train(corpus, overrides={"max_steps": 1}, run_dir=tmp_path / "x")
    with pytest.raises(lmtrain.LmtrainError, match="already holds a run"):
        lmtrain.train(corpus, overrides=OVERRIDES, run_dir=run.run_dir)
    with pytest.raises(lmtrain.LmtrainError, match="max_tokens"):
        lm.generate("x", max_tokens=0)
    with pytest.raises(lmtrain.LmtrainError, match="top_p"):
        lm.generate("x", top_p=0)
    with pytest.raises(lmtrain.LmtrainError, match="empty"):
        lm.perplexity("")
    with pytest.raises(lmtrain.LmtrainError, match="device"):
        lmtrain.load(run.run_dir, device="tpu")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").glob("*.pt"))
    assert isinstance(lmtrain.LmtrainError("x"), Exception) and Path(run.run_dir).is_dir()
