"""The tokenizer/token cache trusts nothing it finds: a damaged, stale or foreign entry is
encoded again with one warning line, never used; a corpus that changes while it is encoded
leaves no entry; one process writes an entry at a time; a killed writer's `.part` is cleaned
up; a full cache disk falls back to a temporary file with one warning (see lmtrain.text.encode)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from helpers import cli, make_lines, ok, write_corpus, write_lines

from lmtrain.locks import exclusive
from lmtrain.text import encode as prepare
from lmtrain.text.corpus import load_text
from lmtrain.text.encode import encode_split, get_tokenizer
from lmtrain.text.tokenizer import train_tokenizer
from lmtrain.text.tokens import HEADER, read_tokens

TINY = ["--set", "model.layers=1", "--set", "model.hidden_size=16", "--set", "model.embedding_size=16",
        "--set", "train.batch_size=4", "--set", "train.bptt=8", "--set", "train.max_steps=2",
        "--set", "tokenizer.vocab_size=60"]
WARNING = "warning: the cached token file "


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A private cache and working directory per test; torch on one thread; no C++ build."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LMTRAIN_COMPILE", "0")
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "cache"
    torch.set_num_threads(threads)


@pytest.fixture
def split(tmp_path):
    """(tokenizer, text, the text's cache entry path, the tokens it holds) of a small split."""
    text = load_text(write_lines(tmp_path / "text.txt", make_lines(200, 1)))
    tokenizer = train_tokenizer(make_lines(300, 0), "bpe", 80)
    tokens = np.asarray(encode_split(tokenizer, text).tokens).copy()
    (entry,) = (tmp_path / "cache" / "tokens").glob("*.tok")
    return tokenizer, text, entry, tokens


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def reencoded(split, capsys, *fragments: str) -> None:
    """Opening the entry again warns once, naming it and the problem, and encodes it afresh."""
    tokenizer, text, entry, tokens = split
    capsys.readouterr()
    got = encode_split(tokenizer, text)
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"{WARNING}{entry} is stale or damaged ("), lines
    assert lines[0].endswith("); encoding again")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert np.array_equal(got.tokens, tokens)
    assert read_tokens(entry).scan_ids()[1] == read_tokens(entry).ids_digest  # whole again
    capsys.readouterr()
    encode_split(tokenizer, text)
    assert warnings_in(capsys.readouterr().err) == []  # and then reused, silently


def rewrite_header(entry: Path, **fields) -> None:
    """Change header fields of a token file (by HEADER's field names) in place."""
    names = ["magic", "version", "width", "vocab_size", "count", "text_bytes", "words", "lines", "chars"]
    data = bytearray(entry.read_bytes())
    values = dict(zip(names, HEADER.unpack_from(data)))
    values.update(fields)
    data[: HEADER.size] = HEADER.pack(*(values[n] for n in names))
    entry.write_bytes(bytes(data))


def test_a_truncated_token_file_is_encoded_again(split, capsys):
    entry = split[2]
    entry.write_bytes(entry.read_bytes()[:-7])
    reencoded(split, capsys, "truncated")


def test_a_header_that_lies_consistently_is_caught(split, capsys):
    """Count smaller and the file cut to match: the size agrees, the ids' digest does not."""
    entry = split[2]
    rewrite_header(entry, count=100)
    entry.write_bytes(entry.read_bytes()[: 160 + 100 * 2])
    assert len(read_tokens(entry).tokens) == 100  # a consistent file, as far as its size goes
    reencoded(split, capsys, "its ids are not those it was written with")


def test_out_of_range_ids_are_encoded_again(split, capsys):
    """Even with the ids' digest made to match: the id range is checked on its own."""
    entry = split[2]
    data = bytearray(entry.read_bytes())
    data[160:162] = (5000).to_bytes(2, "little")
    data[128:160] = hashlib.sha256(bytes(data[160:])).digest()
    entry.write_bytes(bytes(data))
    reencoded(split, capsys, "it holds id 5000, outside the vocabulary of")


def test_another_tokenizers_token_file_under_the_key_is_caught(split, tmp_path, capsys, monkeypatch):
    tokenizer, text, entry, _ = split
    other = train_tokenizer(make_lines(300, 7), "bpe", 80)
    assert other.vocab_size == tokenizer.vocab_size and other.model_proto != tokenizer.model_proto
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "other"))
    encode_split(other, text)  # a valid token file of the same text, by another tokenizer
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    (foreign,) = (tmp_path / "other" / "tokens").glob("*.tok")
    entry.write_bytes(foreign.read_bytes())
    reencoded(split, capsys, "made by another tokenizer")


def test_an_older_token_file_is_stale(split, capsys):
    entry = split[2]
    data = entry.read_bytes()
    entry.write_bytes(data[:64] + data[160:])
    rewrite_header(entry, version=2)
    reencoded(split, capsys, "written by an older lmtrain, token file version 2")


def test_a_damaged_cached_tokenizer_is_trained_again(tmp_path, capsys):
    lines = make_lines(300, 0)
    first = get_tokenizer(lines, "bpe", 80)
    (model,) = (tmp_path / "cache" / "tokenizers").glob("*.model")
    for damage, fragment in ((b"garbage", "sentencepiece cannot load it"),
                             (train_tokenizer(lines, "unigram", 80).model_proto, "it is a unigram model")):
        model.write_bytes(damage)
        capsys.readouterr()
        again = get_tokenizer(lines, "bpe", 80)
        lines_out = warnings_in(capsys.readouterr().err)
        assert len(lines_out) == 1 and lines_out[0].startswith(f"warning: the cached tokenizer {model} is damaged (")
        assert fragment in lines_out[0] and lines_out[0].endswith("); training it again")
        assert again.model_proto == first.model_proto == model.read_bytes()


def test_training_and_evaluate_recover_from_a_truncated_cache_entry(tmp_path, cache):
    corpus = write_corpus(tmp_path / "corpus", sizes=(120, 20, 20))
    ok(cli("train", corpus, "--run-dir", tmp_path / "run", *TINY))
    for entry in (cache / "tokens").glob("*.tok"):
        entry.write_bytes(entry.read_bytes()[:-3])
    result = ok(cli("evaluate", tmp_path / "run", "--json"))
    assert json.loads(result.stdout)["tokens"] > 0
    (line,) = warnings_in(result.stderr)  # only the test split is opened
    assert line.startswith(WARNING) and "truncated" in line
    result = ok(cli("train", corpus, "--run-dir", tmp_path / "run2", *TINY))
    assert len(warnings_in(result.stderr)) == 2  # train and valid; test was encoded again above


def test_a_corpus_rewritten_while_encoded_keeps_no_entry(tmp_path, cache, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", sizes=(120, 20, 20))
    ok(cli("train", corpus, "--run-dir", tmp_path / "run", *TINY))  # the tokenizer, cached
    for entry in (cache / "tokens").glob("*.tok"):
        entry.unlink()
    real = prepare.Tokenizer.encode_pieces

    def rewriting(self, pieces, continued=()):
        (corpus / "train.txt").write_text("Another text altogether.\n" * 120, encoding="utf-8")
        return real(self, pieces, continued)

    monkeypatch.setattr(prepare.Tokenizer, "encode_pieces", rewriting)
    result = cli("train", corpus, "--run-dir", tmp_path / "run2", *TINY)
    helpers.assert_one_error(result, f"{corpus / 'train.txt'} changed while it was being encoded",
                             "its token file was not kept")
    assert list((cache / "tokens").glob("*.tok")) == []
    assert list((cache / "tokens").glob(".*.part")) == []


def test_a_stale_part_is_removed_when_the_cache_is_next_opened(split):
    tokenizer, text, entry, _ = split
    part = entry.parent / f".{entry.name}.k1ll3d.part"
    part.write_bytes(b"\0" * 4096)  # what a SIGKILL mid-encoding leaves
    other_part = entry.parent / ".0123abcd.tok.x.part"  # another entry's, its writer gone too
    other_part.write_bytes(b"\0")
    encode_split(tokenizer, text)
    assert not part.exists() and not other_part.exists()
    assert entry.is_file()


def test_a_part_being_written_is_left_alone(split):
    tokenizer, text, entry, _ = split
    writing = entry.parent / ".feedface.tok.live.part"
    writing.write_bytes(b"\0")
    with exclusive(entry.parent / "feedface.lock", "a live writer"):  # its writer holds the entry's lock
        encode_split(tokenizer, text)
        assert writing.exists()
    encode_split(tokenizer, text)  # now its writer is done: a leftover
    assert not writing.exists()


ENCODE = """
import sys, time
from pathlib import Path
from lmtrain.text import encode as prepare
from lmtrain.text.corpus import load_text
from lmtrain.text.tokenizer import Tokenizer
tokenizer = Tokenizer(open(sys.argv[1], "rb").read(), "bpe")
real = Tokenizer.encode_pieces
def gated(self, pieces, continued=()):
    deadline = time.monotonic() + 60
    while not Path(sys.argv[3]).exists() and time.monotonic() < deadline:  # the test opens the gate
        time.sleep(0.02)
    return real(self, pieces, continued)
Tokenizer.encode_pieces = gated
print(len(prepare.encode_split(tokenizer, load_text(Path(sys.argv[2])), workers=1).tokens))
"""


def test_two_processes_encoding_one_entry_write_it_once(tmp_path, cache):
    """The first holds the entry while it encodes (held there until the second says it waits);
    the second waits, with one note, then reuses the first one's entry."""
    text_path = write_lines(tmp_path / "text.txt", make_lines(200, 1))
    model = tmp_path / "t.model"
    model.write_bytes(train_tokenizer(make_lines(300, 0), "bpe", 80).model_proto)
    gate = tmp_path / "gate"
    env = {**os.environ, "PYTHONPATH": str(Path(prepare.__file__).parents[1]), "LMTRAIN_CACHE": str(cache),
           "OMP_NUM_THREADS": "1"}

    def start():
        return subprocess.Popen([sys.executable, "-c", ENCODE, model, text_path, gate], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    try:
        first = start()
        deadline = time.monotonic() + 60
        while not list((cache / "tokens").glob(".*.part")) and time.monotonic() < deadline:
            time.sleep(0.02)  # the first is writing its entry, under the lock
        second = start()
        note = second.stderr.readline()  # blocks until the second says it waits
    finally:
        gate.touch()
    results = [first.communicate(timeout=60), second.communicate(timeout=60)]
    assert [first.returncode, second.returncode] == [0, 0], results
    assert note.startswith(f"note: waiting for the cache entry {cache / 'tokens'}"), note
    assert "in use by another lmtrain process (pid " in note
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1] == ""  # no other line: no warning, the entry reused whole
    (entry,) = (cache / "tokens").glob("*.tok")
    assert list((cache / "tokens").glob(".*.part")) == []
    assert int(results[0][0]) == len(read_tokens(entry).tokens)


def test_a_full_cache_disk_falls_back_to_a_temporary_file(split, capsys, monkeypatch):
    tokenizer, text, entry, tokens = split
    entry.unlink()
    real_write = prepare.TokenWriter.write
    writers = []

    def full(self, ids):  # the cache's file (the first writer) hits a full disk; the temporary one does not
        if not writers:
            writers.append(self)
        if self is writers[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, ids)

    monkeypatch.setattr(prepare.TokenWriter, "write", full)
    capsys.readouterr()
    got = encode_split(tokenizer, text)
    assert np.array_equal(got.tokens, tokens)
    lines = warnings_in(capsys.readouterr().err)
    assert lines == [f"warning: cannot write the token file {entry} (No space left on device); encoding "
                     f"{text.name} into a temporary file instead, without reuse (free some space, or set LMTRAIN_CACHE)"]
    assert not entry.exists() and list(entry.parent.glob(".*.part")) == []


def test_a_full_disk_everywhere_is_one_error_line(split, monkeypatch):
    tokenizer, text, entry, _ = split
    entry.unlink()

    def full(self, ids):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare.TokenWriter, "write", full)
    with pytest.raises(prepare.LmtrainError, match="cannot write a temporary token file: No space left on device"):
        encode_split(tokenizer, text)
    assert list(entry.parent.glob(".*.part")) == []
