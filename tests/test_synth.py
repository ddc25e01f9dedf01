"""The copy task (lmtrain.tools.synth), its `lmtrain synth` command and the cell comparison's table.

The optimum is checked against a brute-force ideal model: every line of the language is
enumerated, and each token's probability is the fraction of lines that continue the current
line's prefix with it, over token ids from our own tokenizer, laid out as training lays them out.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.model import load_run
from lmtrain.text.encode import get_tokenizer
from lmtrain.text.tokenizer import EOS_ID
from lmtrain.text.tokens import batchify
from lmtrain.tools import compare
from lmtrain.tools.synth import (
    SEPARATOR,
    copy_task_lines,
    memoryless_perplexity,
    optimum_nll,
    optimum_perplexity,
    symbols,
    write_copy_corpus,
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))


def test_lines_are_k_symbols_a_separator_and_the_same_k_again():
    k, alphabet = 5, 7
    lines = copy_task_lines(200, k, alphabet, random.Random(0))
    assert len(lines) == 200
    for line in lines:
        words = line.split(" ")
        assert len(words) == 2 * k + 1
        assert words[k] == SEPARATOR
        assert words[:k] == words[k + 1 :]
        assert set(words[:k]) <= set(symbols(alphabet))
    # uniform over the alphabet: every symbol turns up, and first halves differ
    assert {w for line in lines for w in line.split()[:k]} == set(symbols(alphabet))
    assert len(set(lines)) > 190


def test_the_same_seed_writes_the_same_corpus(tmp_path):
    args = dict(k=4, alphabet_size=5, n_train=50, n_valid=5, n_test=5)
    a = write_copy_corpus(tmp_path / "a", seed=3, **args)
    b = write_copy_corpus(tmp_path / "b", seed=3, **args)
    c = write_copy_corpus(tmp_path / "c", seed=4, **args)
    assert sorted(a) == ["test", "train", "valid"]
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    assert len(a["train"].read_text().splitlines()) == 50
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["test.txt", "train.txt", "valid.txt"]  # no temporary files left


def ideal_nll(k: int, alphabet: int, n_lines: int) -> float:
    """Average NLL per predicted token of the ideal model on a generated corpus, by enumeration."""
    corpus = copy_task_lines(n_lines, k, alphabet, random.Random(1))
    tokenizer = get_tokenizer(corpus, "word", 100)
    # every line of the language as token ids, <eos> included, and how many lines share each prefix
    language = [tokenizer.encode_lines([f"{' '.join(h)} {SEPARATOR} {' '.join(h)}"]).tolist()
                for h in itertools.product(symbols(alphabet), repeat=k)]
    prefixes = Counter(tuple(line[:i]) for line in language for i in range(len(line) + 1))
    # the stream as training and evaluation see it: <eos>, then every token once (batchify)
    inputs, targets = batchify(tokenizer.encode_lines(corpus), 1, EOS_ID, pad=True)
    total, line_so_far = 0.0, []
    for x, y in zip(inputs[:, 0].tolist(), targets[:, 0].tolist()):
        line_so_far = [] if x == EOS_ID else line_so_far + [x]
        p = prefixes[tuple(line_so_far + [y])] / prefixes[tuple(line_so_far)]
        total -= math.log(p)
    return total / len(targets)


@pytest.mark.parametrize("k, alphabet", [(1, 2), (3, 3), (2, 5)])
def test_optimum_is_the_ideal_models_nll(k, alphabet):
    assert ideal_nll(k, alphabet, 300) == pytest.approx(optimum_nll(k, alphabet), rel=1e-12)
    assert optimum_perplexity(k, alphabet) == pytest.approx(math.exp(k * math.log(alphabet) / (2 * k + 2)))
    assert memoryless_perplexity(k, alphabet) == pytest.approx(optimum_perplexity(k, alphabet) ** 2)


def test_synth_command_writes_the_corpus_and_prints_the_optimum(tmp_path):
    out = tmp_path / "copy"
    result = CliRunner().invoke(app, ["synth", str(out), "--k", "3", "--alphabet", "4", "--lines", "100", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert f"optimum ppl {optimum_perplexity(3, 4):.4f}" in result.stdout
    lines = {split: (out / f"{split}.txt").read_text().splitlines() for split in ("train", "valid", "test")}
    assert [len(v) for v in lines.values()] == [100, 5, 5]
    assert lines["train"][0].split()[3] == SEPARATOR


@pytest.mark.parametrize("args, fragment", [
    (["--k", "0"], "--k"),
    (["--alphabet", "1"], "--alphabet"),
    (["--lines", "0"], "--lines"),
])
def test_synth_command_rejects_bad_arguments(tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "copy"), *args])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and fragment in result.stderr
    assert not (tmp_path / "copy").exists()


def test_synth_command_reports_an_unwritable_directory(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "file" / "copy")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot write the corpus to") and len(result.stderr.splitlines()) == 1


def test_format_table():
    rows = [compare.Row("lstm", 84203, 2.71234, 3000, 1.25), compare.Row("rnn", 22379, 6.0, 3000, 0.349)]
    assert compare.format_table(rows, 2.6112).splitlines() == [
        "| cell | parameters | valid ppl | optimum | steps | minutes |",
        "|---|---:|---:|---:|---:|---:|",
        "| lstm | 84,203 | 2.712 | 2.611 | 3,000 | 1.2 |",
        "| rnn | 22,379 | 6.000 | 2.611 | 3,000 | 0.3 |",
    ]


def test_compare_runs_every_cell_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = compare.main([
            "--out", str(tmp_path / "cmp"), "--k", "2", "--alphabet", "3", "--lines", "60", "--valid-lines", "5",
            "--steps", "2", "--set", "model.hidden_size=8", "--set", "model.embedding_size=4", "--set", "train.batch_size=4",
        ])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == list(compare.ENTRIES)
    assert all(f"| {optimum_perplexity(2, 3):.3f} | 2 |" in line for line in table[1:])
    for entry in compare.ENTRIES:
        assert (tmp_path / "cmp" / "k2" / entry / "best.pt").is_file()
    reservoir = load_run(tmp_path / "cmp" / "k2" / "reservoir", torch.device("cpu"))
    assert reservoir.config.model.reservoir and reservoir.config.model.cell == "rnn"
    assert load_run(tmp_path / "cmp" / "k2" / "grid", torch.device("cpu")).config.model.stack == "grid"


def test_compare_makes_a_table_per_lag(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = compare.main([
            "--out", str(tmp_path / "cmp"), "--k", "1,3", "--alphabet", "3", "--lines", "40", "--valid-lines", "4",
            "--steps", "1", "--cells", "rnn,reservoir", "--set", "model.hidden_size=8", "--set", "model.embedding_size=4",
            "--set", "train.batch_size=4",
        ])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0
    assert [line.split(";")[0] for line in out.splitlines() if line.startswith("Copy task")] == [
        "Copy task: K = 1 (a lag of 2 steps), alphabet 3", "Copy task: K = 3 (a lag of 4 steps), alphabet 3"]
    assert load_run(tmp_path / "cmp" / "k3" / "rnn", torch.device("cpu")).config.train.bptt == 2 * (2 * 3 + 2)


@pytest.mark.parametrize("k", ["0", "4,x", ","])
def test_compare_rejects_a_bad_lag(tmp_path, capsys, k):
    assert compare.main(["--out", str(tmp_path), "--k", k]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --k") and len(err.splitlines()) == 1


def test_compare_rejects_an_unknown_cell(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path), "--cells", "lstm,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cells") and "nope" in err
