"""Streaming corpora: sampling the tokenizer's training lines, encoding files block by block in a
worker pool, and the lazy batch layout. Each streaming path is checked against the in-memory one.

Block and long-line sizes are made small (monkeypatching lmtrain.text.corpus), so files of a few KB
take the many-block paths that real corpora take at MB sizes.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import make_lines, write_lines

from lmtrain.text import corpus as corpus_module, encode as prepare
from lmtrain.text.blocks import text_stats
from lmtrain.text.corpus import lines_text, load_corpus, load_text, split_lines
from lmtrain.text.encode import encode_split, get_tokenizer
from lmtrain.text.tokenizer import EOS_ID, reservoir_sample, train_tokenizer
from lmtrain.text.tokens import batchify, lazy_batchify, windows


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMTRAIN_CACHE", str(cache))
    return cache


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 2 KB and long lines from 300 bytes, so small files cross many block boundaries."""
    monkeypatch.setattr(corpus_module, "BLOCK_BYTES", 2048)
    monkeypatch.setattr(corpus_module, "LONG_LINE_BYTES", 300)


def varied_lines(n: int, seed: int) -> list[str]:
    """Generated sentences with blank lines, non-ASCII text and a few very long lines."""
    rng = random.Random(seed)
    lines = make_lines(n, seed)
    for i in range(0, n, 17):
        lines[i] = ""
    for i in range(5, n, 23):
        lines[i] += " café naïve – 東京"
    for i in range(11, n, 97):  # well past the 300-byte long-line limit
        lines[i] = " ".join(make_lines(80, seed + i))
    lines[40] = "x" * 1000  # no space to cut at: cut at the limit, through the "word"
    lines[41] = "é" * 700  # two-byte characters: the cut must fall on a character boundary
    rng.shuffle(lines)
    return lines


# --- the tokenizer's sample ----------------------------------------------------------------


def test_reservoir_sample_keeps_everything_when_it_fits():
    items = [f"line {i}" for i in range(50)]
    assert reservoir_sample(items, 50, seed=3) == items
    assert reservoir_sample(iter(items), 1000, seed=3) == items


def test_reservoir_sample_is_seeded_ordered_and_uniform():
    n, k, draws = 40, 8, 3000
    items = list(range(n))
    first = reservoir_sample(items, k, seed=1)
    assert first == reservoir_sample(items, k, seed=1) and len(first) == k
    assert first == sorted(first)  # in the order of the input
    counts = np.zeros(n)
    for seed in range(draws):
        counts[reservoir_sample(iter(items), k, seed)] += 1
    # each item is drawn with probability k/n = 0.2; 0.2 +- 0.04 is more than 5 standard deviations
    assert np.all(np.abs(counts / draws - k / n) < 0.04), counts / draws


def test_tokenizer_of_a_file_equals_the_one_of_its_lines_in_memory(tmp_path):
    lines = make_lines(400, 1)
    path = write_lines(tmp_path / "train.txt", lines)
    from_file = get_tokenizer(load_text(path), "bpe", 120)
    assert from_file.model_proto == train_tokenizer(lines, "bpe", 120).model_proto
    assert from_file.model_proto == get_tokenizer(lines, "bpe", 120).model_proto


def test_tokenizer_trains_on_a_bounded_sample(tmp_path):
    lines = make_lines(3000, 2)
    sampled = train_tokenizer(lines, "bpe", 120, sample_lines=200)
    assert sampled.model_proto == train_tokenizer(lines, "bpe", 120, sample_lines=200).model_proto  # seeded
    whole = train_tokenizer(lines, "bpe", 120)
    assert sampled.model_proto != whole.model_proto
    # the sample is what sentencepiece saw: training on those 200 lines directly gives the same model
    sample = reservoir_sample(lines, 200, seed=0)
    assert sampled.model_proto == train_tokenizer(sample, "bpe", 120, sample_lines=200).model_proto


# --- encoding files in blocks and workers ----------------------------------------------------


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_streamed_encoding_equals_in_memory_encoding(kind, tmp_path, small_blocks):
    lines = varied_lines(600, 4)
    path = write_lines(tmp_path / "text.txt", lines)
    text = load_text(path)
    assert text.size > 10 * corpus_module.BLOCK_BYTES
    tokenizer = train_tokenizer(lines, kind, 150)
    pooled = encode_split(tokenizer, text, workers=2)
    prepare.cache_dir().joinpath("tokens").mkdir(parents=True, exist_ok=True)
    for f in (prepare.cache_dir() / "tokens").iterdir():
        f.unlink()  # encode again, in this process
    single = encode_split(tokenizer, text, workers=1)
    memory = encode_split(tokenizer, lines_text(lines))
    assert np.array_equal(pooled.tokens, single.tokens)
    assert np.array_equal(pooled.tokens, memory.tokens)
    counted = text_stats(lines)
    for tf in (pooled, single, memory):
        assert (tf.text_bytes, tf.text_words, tf.text_lines, tf.text_chars) == tuple(counted)
    assert int((np.asarray(pooled.tokens) == EOS_ID).sum()) == len(lines)  # one <eos> per line, long ones too


def test_long_lines_cut_at_spaces_encode_like_whole_lines(tmp_path, small_blocks):
    """A long line of single-spaced words gives the same BPE tokens in pieces as whole."""
    lines = [" ".join(make_lines(200, 5)), "short line .", " ".join(make_lines(50, 6))]
    assert len(lines[0].encode()) > 20 * corpus_module.LONG_LINE_BYTES
    tokenizer = train_tokenizer(make_lines(500, 7), "bpe", 150)
    whole = np.concatenate([np.append(tokenizer.sp.encode(line), EOS_ID) for line in lines])
    streamed = encode_split(tokenizer, load_text(write_lines(tmp_path / "long.txt", lines)), workers=2)
    assert np.array_equal(np.asarray(streamed.tokens, dtype=np.int64), whole)


def test_crlf_and_bom_encode_like_lf(tmp_path, small_blocks):
    lines = varied_lines(300, 8)
    tokenizer = train_tokenizer(lines, "bpe", 150)
    lf = encode_split(tokenizer, load_text(write_lines(tmp_path / "lf.txt", lines)), workers=2)
    crlf_path = tmp_path / "crlf.txt"
    crlf_path.write_bytes(b"\xef\xbb\xbf" + "".join(line + "\r\n" for line in lines).encode())
    crlf = encode_split(tokenizer, load_text(crlf_path), workers=2)
    assert np.array_equal(lf.tokens, crlf.tokens)
    assert (lf.text_bytes, lf.text_lines, lf.text_chars) == (crlf.text_bytes, crlf.text_lines, crlf.text_chars)


def test_single_file_split_streams_like_the_split_in_memory(tmp_path, small_blocks):
    lines = varied_lines(500, 9)
    lines[-1] = "a last line without a newline"
    path = tmp_path / "one.txt"
    path.write_bytes("\n".join(lines).encode())
    streamed = load_corpus(path)
    in_memory = split_lines(lines, "x")
    tokenizer = get_tokenizer(streamed.splits["train"], "bpe", 150)
    # (get_tokenizer, not train_tokenizer: both paths train on long lines cut into pieces)
    assert tokenizer.model_proto == get_tokenizer(in_memory["train"], "bpe", 150).model_proto
    for split, part in in_memory.items():
        assert len(streamed.splits[split]) == len(part)
        got = encode_split(tokenizer, streamed.splits[split], workers=2)
        assert np.array_equal(got.tokens, encode_split(tokenizer, part).tokens), split


def test_interrupted_encoding_leaves_no_token_file(tmp_path, private_cache, small_blocks, monkeypatch):
    lines = make_lines(800, 10)
    text = load_text(write_lines(tmp_path / "text.txt", lines))
    tokenizer = train_tokenizer(lines, "bpe", 100)
    calls = []

    def interrupted(pieces, continued=()):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return type(tokenizer).encode_pieces(tokenizer, pieces, continued)

    monkeypatch.setattr(tokenizer, "encode_pieces", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_split(tokenizer, text, workers=1)
    # no token file, no temporary part: only the entry's lock file, which stays (see lmtrain.locks)
    assert [p.suffix for p in (private_cache / "tokens").iterdir()] == [".lock"]
    monkeypatch.undo()
    monkeypatch.setenv("LMTRAIN_CACHE", str(private_cache))
    assert len(encode_split(tokenizer, text).tokens) == len(tokenizer.encode_lines(lines))


def test_encoding_without_a_writable_cache_still_works(tmp_path, monkeypatch):
    lines = make_lines(200, 11)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("LMTRAIN_CACHE", str(blocked))  # a file: no cache directory can be made
    tokenizer = train_tokenizer(lines, "bpe", 100)
    got = encode_split(tokenizer, load_text(write_lines(tmp_path / "t.txt", lines)))
    assert np.array_equal(got.tokens, tokenizer.encode_lines(lines))


# --- the lazy batch layout -----------------------------------------------------------------


@pytest.mark.parametrize("n, batch_size", [(1, 1), (7, 2), (100, 3), (101, 10), (512, 8), (33, 40)])
@pytest.mark.parametrize("pad", [False, True])
def test_lazy_batchify_equals_batchify(n, batch_size, pad):
    tokens = np.random.default_rng(n).integers(2, 500, size=n).astype(np.uint16)
    lazy_inputs, lazy_targets = lazy_batchify(tokens, batch_size, EOS_ID, pad=pad)
    if n < batch_size and not pad:  # not one full row (batchify fails here; training checks first)
        assert len(lazy_inputs) == len(lazy_targets) == 0
        return
    inputs, targets = batchify(tokens, batch_size, EOS_ID, pad=pad)
    assert lazy_inputs.size(0) == len(lazy_inputs) == inputs.size(0)
    assert lazy_inputs.shape == inputs.shape and lazy_targets.shape == targets.shape
    assert torch.equal(lazy_inputs[:], inputs) and torch.equal(lazy_targets[:], targets)
    for bptt in (1, 3, 35):
        for (x, y), (lx, ly) in zip(windows(inputs, targets, bptt), windows(lazy_inputs, lazy_targets, bptt), strict=True):
            assert lx.dtype == torch.int64 and torch.equal(lx, x) and torch.equal(ly, y)


def test_lazy_batchify_reads_a_memmap(tmp_path):
    from lmtrain.text.tokens import read_tokens, write_tokens

    ids = np.arange(2, 1002) % 300
    write_tokens(tmp_path / "t.tok", ids, 300, text_bytes=0, text_words=0, text_lines=0)
    tokens = read_tokens(tmp_path / "t.tok").tokens
    assert isinstance(tokens, np.memmap)
    inputs, targets = lazy_batchify(tokens, 4, EOS_ID)
    assert torch.equal(targets[10:20], batchify(ids, 4, EOS_ID)[1][10:20])


@pytest.mark.parametrize("share", [slice(0, 2), slice(2, 4), slice(1, 3), slice(3, 3)])
def test_lazy_streams_cut_by_columns_equal_the_tensor_cut(share):
    """A rank's share of the streams, as lmtrain.training.distributed cuts them: inputs[:, a:b].contiguous()."""
    tokens = np.random.default_rng(0).integers(2, 500, size=203)
    for pad in (False, True):
        inputs, targets = batchify(tokens, 4, EOS_ID, pad=pad)
        lazy_inputs, lazy_targets = lazy_batchify(tokens, 4, EOS_ID, pad=pad)
        x, y = lazy_inputs[:, share].contiguous(), lazy_targets[:, share].contiguous()
        assert x.size(1) == inputs[:, share].size(1) and len(x) == len(inputs)
        assert torch.equal(x[5:17], inputs[:, share][5:17]) and torch.equal(y[:], targets[:, share])
