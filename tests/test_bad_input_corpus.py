"""The corpus part of the bad-input matrix, through the command line (typer's CliRunner).

Every bad corpus must give exactly one line `error: ...` on stderr and exit code 2, with no
traceback, no run directory and nothing half-written in the cache. Corpora a user would want
trained (CRLF line ends, invalid bytes with --encoding-errors replace, one enormous line) must
train.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import make_lines, ok, write_corpus
from typer.testing import CliRunner, Result

from lmtrain.cli import app
from lmtrain.text import corpus as corpus_module
from lmtrain.text.blocks import read_blocks
from lmtrain.text.corpus import BLOCK_BYTES, load_corpus, load_text
from lmtrain.text.encode import encode_split
from lmtrain.text.tokenizer import EOS_ID, Tokenizer

TINY = ["--set", "model.layers=1", "--set", "model.hidden_size=16", "--set", "model.embedding_size=16",
        "--set", "train.batch_size=4", "--set", "train.bptt=8", "--set", "train.epochs=1",
        "--set", "tokenizer.vocab_size=60"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache and working directory per test; torch on one thread (tiny models, shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "cache"
    torch.set_num_threads(threads)


def cli(*args) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def train(corpus: Path, run: Path, *extra) -> Result:
    return cli("train", corpus, "--run-dir", run, *TINY, *extra)


def assert_trained(result: Result) -> None:
    ok(result)


def assert_one_error(result: Result, *fragments: str) -> str:
    """helpers.assert_one_error, with nothing on stdout either; return the error line."""
    line = helpers.assert_one_error(result, *fragments)
    assert result.stdout == "", result.stdout
    return line


def assert_nothing_half_written(tmp_path: Path, cache: Path) -> None:
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]  # atomic_open's temporary files


def corpus_dir(tmp_path: Path, train_bytes: bytes | None = None, missing: str | None = None) -> Path:
    folder = write_corpus(tmp_path / "corpus")
    if train_bytes is not None:
        (folder / "train.txt").write_bytes(train_bytes)
    if missing:
        (folder / missing).unlink()
    return folder


def one_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    return path


# id: (corpus maker, extra arguments, fragments of the error line)
BAD_CORPORA = {
    "missing-path": (lambda tmp: tmp / "no-such-corpus", [], ["corpus not found", "no-such-corpus"]),
    "directory-without-train": (lambda tmp: corpus_dir(tmp, missing="train.txt"), [], ["lacks train.txt"]),
    "empty-file": (lambda tmp: one_file(tmp, b""), [], ["corpus.txt", "is empty"]),
    "empty-train-split": (lambda tmp: corpus_dir(tmp, b""), [], ["train.txt", "is empty"]),
    "whitespace-only": (lambda tmp: one_file(tmp, b" \n\t\n  \r\n\n" * 100), [], ["corpus.txt", "only whitespace"]),
    "binary": (lambda tmp: one_file(tmp, b"some text\n" * 30 + bytes(range(256)) * 4), [], ["corpus.txt", "binary", "offset 300"]),
    "invalid-utf8": (lambda tmp: one_file(tmp, b"hello world\n" * 30 + b"bad \xff byte\n" * 20), [],
                     ["corpus.txt", "not valid UTF-8", "0xff", "offset 364", "--encoding-errors replace"]),
    "truncated-utf8-at-end": (lambda tmp: one_file(tmp, b"caf\xc3\xa9 au lait\n" * 30 + b"caf\xc3"), [],
                              ["corpus.txt", "not valid UTF-8", "0xc3", "offset 423"]),
    "smaller-than-one-batch": (lambda tmp: one_file(tmp, b"one line\ntwo line\nthree line\n"),
                               ["--set", "train.batch_size=20", "--set", "train.bptt=35", "--set", "tokenizer.kind=word"],
                               ["too few for one batch", "train.batch_size"]),
    "fewer-than-three-lines": (lambda tmp: one_file(tmp, b"a single line of text"), [], ["1 line(s)", "at least 3"]),
    "vocabulary-beyond-sentencepiece": (lambda tmp: corpus_dir(tmp), ["--set", "tokenizer.vocab_size=3000000000"],
                                        ["tokenizer.vocab_size' must be at most 16,777,216", "got 3,000,000,000"]),
    "vocabulary-too-small-for-chars": (lambda tmp: corpus_dir(tmp), ["--set", "tokenizer.vocab_size=10"],
                                       ["tokenizer.vocab_size 10 is too small", "at least"]),
    "bad-encoding-errors-option": (lambda tmp: corpus_dir(tmp), ["--encoding-errors", "ignore"], ["--encoding-errors", "ignore"]),
}


@pytest.mark.parametrize("make, extra, fragments", BAD_CORPORA.values(), ids=BAD_CORPORA.keys())
def test_bad_corpus_gives_one_error_line(make, extra, fragments, tmp_path, isolated):
    result = train(make(tmp_path), tmp_path / "run", *extra)
    assert_one_error(result, *fragments)
    assert_nothing_half_written(tmp_path, isolated)


def test_vocabulary_larger_than_the_corpus_allows_is_refused(tmp_path, isolated):
    """bpe/unigram: asking for more pieces than the training text can give is one error line that
    names the key and the largest size this corpus allows; that size then trains."""
    result = train(corpus_dir(tmp_path), tmp_path / "run", "--set", "tokenizer.vocab_size=5000")
    assert_one_error(result, "tokenizer.vocab_size", "5,000", "more than this corpus allows")
    assert_nothing_half_written(tmp_path, isolated)
    largest = int(result.stderr.split("set tokenizer.vocab_size to ")[1].split(" ")[0].replace(",", ""))
    assert 60 < largest < 5000
    ok = train(corpus_dir(tmp_path / "again"), tmp_path / "run", "--set", f"tokenizer.vocab_size={largest}")
    assert_trained(ok)
    assert Tokenizer((tmp_path / "run" / "tokenizer.model").read_bytes(), "bpe").vocab_size == largest


def test_invalid_utf8_trains_with_encoding_errors_replace(tmp_path):
    folder = corpus_dir(tmp_path)
    good = (folder / "train.txt").read_bytes()
    (folder / "train.txt").write_bytes(good + b"bad \xff\xfe bytes here\n" * 5)
    assert_one_error(train(folder, tmp_path / "run"), "train.txt", f"offset {len(good) + 4}")
    assert_trained(train(folder, tmp_path / "run", "--encoding-errors", "replace"))
    # evaluating the run's own splits reads its corpus the same way
    result = cli("evaluate", tmp_path / "run", "--split", "train", "--encoding-errors", "replace", "--json")
    assert_trained(result)
    assert json.loads(result.stdout)["tokens"] > 0


def test_crlf_corpus_trains_to_the_same_tokens_as_lf(tmp_path):
    lf = write_corpus(tmp_path / "lf")
    crlf = write_corpus(tmp_path / "crlf", newline="\r\n")
    assert (lf / "train.txt").read_bytes() != (crlf / "train.txt").read_bytes()
    assert_trained(train(lf, tmp_path / "run-lf"))
    assert_trained(train(crlf, tmp_path / "run-crlf"))
    model = (tmp_path / "run-lf" / "tokenizer.model").read_bytes()
    assert model == (tmp_path / "run-crlf" / "tokenizer.model").read_bytes()
    tokenizer = Tokenizer(model, "bpe")
    for split in ("train", "valid", "test"):
        a = encode_split(tokenizer, load_corpus(lf).splits[split])
        b = encode_split(tokenizer, load_corpus(crlf).splits[split])
        assert np.array_equal(a.tokens, b.tokens) and a.text_bytes == b.text_bytes


def test_a_long_line_without_newline_trains_in_pieces(tmp_path, monkeypatch):
    """The mechanism behind a 100 MB one-line file, at a small scale: lines past LONG_LINE_BYTES
    are read and encoded in pieces cut at spaces, with one <eos> at the line's end."""
    monkeypatch.setattr(corpus_module, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(corpus_module, "LONG_LINE_BYTES", 512)
    words = " ".join(make_lines(6000, 3))  # about 250 KB, no newline
    folder = corpus_dir(tmp_path, words.encode())
    run = tmp_path / "run"
    assert_trained(train(folder, run, "--set", "tokenizer.kind=word", "--set", "tokenizer.vocab_size=200"))
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["tokenizer"]["kind"] == "word"
    tokenizer = Tokenizer((run / "tokenizer.model").read_bytes(), "word")
    tokens = np.asarray(encode_split(tokenizer, load_corpus(folder).splits["train"], workers=2).tokens)
    assert len(tokens) == len(words.split()) + 1  # every word, then the line's one <eos>
    assert np.flatnonzero(tokens == EOS_ID).tolist() == [len(tokens) - 1]


def test_a_100mb_line_is_read_in_bounded_pieces(tmp_path):
    """A real 100 MB file without a newline: checking it and cutting it into pieces is one pass in
    bounded memory (no piece above LONG_LINE_BYTES plus a few bytes of slack); as a single-file
    corpus it is one line, which cannot be split 90/5/5, and says so."""
    path = tmp_path / "corpus.txt"
    chunk = (" ".join(make_lines(2000, 4)) + " ").encode()
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(100 * 2**20 // len(chunk) + 1))
    assert path.stat().st_size >= 100 * 2**20
    assert_one_error(train(path, tmp_path / "run"), "1 line(s)", "at least 3")
    text = load_text(path)
    assert len(text) == 1 and text.size == path.stat().st_size
    sizes = [len(block.data) for block in read_blocks(text)]
    assert sum(sizes) == text.size
    assert max(sizes) <= corpus_module.LONG_LINE_BYTES + 4 < BLOCK_BYTES


def test_evaluate_missing_file_and_bad_files(tmp_path):
    run = tmp_path / "run"
    assert_trained(train(corpus_dir(tmp_path), run))
    before = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert_one_error(cli("evaluate", run, tmp_path / "no-such-file.txt"), "not found", "no-such-file.txt")
    (tmp_path / "bad.txt").write_bytes(b"fine\nnot \xc0 fine\n")
    assert_one_error(cli("evaluate", run, tmp_path / "bad.txt"), "bad.txt", "offset 9")
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_one_error(cli("evaluate", run, tmp_path / "empty.txt"), "empty.txt", "is empty")
    result = cli("evaluate", run, tmp_path / "bad.txt", "--encoding-errors", "replace", "--json")
    assert_trained(result)
    assert json.loads(result.stdout)["files"][0]["words"] == 4 + 2  # fine / not \ufffd fine: 4 words, 2 line ends
    after = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert after == sorted(before + [tmp_path / "bad.txt", tmp_path / "empty.txt"])  # evaluate wrote nothing
