"""Tokenizer kinds, round trips, the token-file format, and the published word-level counts."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lmtrain.errors import LmtrainError
from lmtrain.text.blocks import text_stats
from lmtrain.text.corpus import load_corpus
from lmtrain.text.encode import encode_split, get_tokenizer
from lmtrain.text.tokenizer import EOS_ID, UNK_ID, train_tokenizer
from lmtrain.text.tokens import batchify, read_tokens, windows, write_tokens

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "    indented code(x) -> y  # with  double  spaces",
    "Unicode: naïve café, Ελληνικά, 日本語.",
    "",
    "the end",
] * 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_subword_round_trip_is_exact(kind):
    tokenizer = train_tokenizer(LINES, kind, 120)
    ids = tokenizer.encode_lines(LINES)
    assert (ids == EOS_ID).sum() == len(LINES)  # one end-of-sentence per line, blank lines too
    assert tokenizer.decode(ids.tolist()) == "".join(line + "\n" for line in LINES)


def test_word_mode_maps_literal_unk_and_unseen_words_to_unknown():
    tokenizer = train_tokenizer(["a b <unk> c", "b c d"], "word", 100)
    assert tokenizer.vocab_size == 2 + 4  # <unk>, <eos>, a b c d; the literal <unk> is no word
    ids = tokenizer.encode_lines(["a <unk> <unk> zebra d"]).tolist()
    # one id per word: sentencepiece's own encoder would merge the run of unknowns
    assert ids[1:4] == [UNK_ID] * 3
    assert len(ids) == 6 and ids[-1] == EOS_ID
    assert tokenizer.decode(ids) == " a <unk> <unk> <unk> d\n"


def test_too_small_vocabulary_is_a_clear_error():
    with pytest.raises(LmtrainError, match="vocab_size"):
        train_tokenizer(LINES, "unigram", 5)


def test_tokenizer_and_tokens_are_cached_by_content(tmp_path):
    first = get_tokenizer(LINES, "bpe", 100)
    second = get_tokenizer(LINES, "bpe", 100)
    assert first.model_proto == second.model_proto
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.model"))) == 1
    a = encode_split(first, LINES[:10])
    b = encode_split(first, LINES[:10])
    assert np.array_equal(a.tokens, b.tokens)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.tok"))) == 1
    encode_split(first, LINES[:11])
    assert len(list((tmp_path / "cache" / "tokens").glob("*.tok"))) == 2


@pytest.mark.parametrize("vocab_size,width", [(1000, 2), (70_000, 4)])
def test_token_file_round_trip(tmp_path, vocab_size, width):
    tokens = np.array([0, 1, 5, vocab_size - 1], dtype=np.int64)
    path = tmp_path / "x.tok"
    text_digest, tokenizer_digest = "ab" * 32, "cd" * 32
    write_tokens(path, tokens, vocab_size, text_bytes=10, text_words=3, text_lines=1, text_chars=9,
                 text_digest=text_digest, tokenizer_digest=tokenizer_digest)
    assert path.stat().st_size == 160 + 4 * width
    loaded = read_tokens(path)
    assert isinstance(loaded.tokens, np.memmap)
    assert loaded.tokens.tolist() == tokens.tolist()
    assert (loaded.vocab_size, loaded.text_bytes, loaded.text_words, loaded.text_lines, loaded.text_chars) == (
        vocab_size, 10, 3, 1, 9)
    assert (loaded.version, loaded.text_digest, loaded.tokenizer_digest) == (3, text_digest, tokenizer_digest)
    assert loaded.scan_ids() == (vocab_size - 1, loaded.ids_digest)
    current = path.read_bytes()
    for version in (2, 1):  # older files: the 64-byte header, the ids right after it, no digests
        old = bytearray(current[:64] + current[160:])
        old[8:12] = version.to_bytes(4, "little")
        path.write_bytes(bytes(old))
        loaded = read_tokens(path)
        assert loaded.tokens.tolist() == tokens.tolist()
        assert (loaded.version, loaded.text_digest, loaded.ids_digest) == (version, "", "")
        assert loaded.text_chars == (9 if version == 2 else 0)


def test_foreign_or_truncated_token_file_is_refused(tmp_path):
    path = tmp_path / "x.tok"
    write_tokens(path, np.arange(10), 100, text_bytes=1, text_words=1, text_lines=1)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(LmtrainError, match="truncated"):
        read_tokens(path)
    path.write_bytes(b"not a token file at all" * 4)
    with pytest.raises(LmtrainError, match="not an lmtrain token file"):
        read_tokens(path)


def test_batchify_lays_out_contiguous_streams():
    tokens = np.arange(10, 17)  # a b c d e f g
    inputs, targets = batchify(tokens, 2, start_id=1)
    assert targets.t().tolist() == [[10, 11, 12], [13, 14, 15]]
    assert inputs.t().tolist() == [[1, 10, 11], [12, 13, 14]]
    inputs, targets = batchify(tokens, 2, start_id=1, pad=True)
    assert targets.t().tolist() == [[10, 11, 12, 13], [14, 15, 16, -1]]
    assert inputs[:, 1].tolist()[:3] == [13, 14, 15]
    assert (targets >= 0).sum() == len(tokens)  # padded layout predicts every token once
    shapes = [x.shape[0] for x, _ in windows(inputs, targets, 3)]
    assert shapes == [3, 1]


def test_text_stats_counts_bytes_words_lines_and_characters():
    assert text_stats(["ab cd", "é"]) == (6 + 3, 3, 2, 6 + 2)  # é: two bytes, one character


@pytest.mark.parametrize(
    "name,vocab,test_tokens",
    [("ptb", 10_000, 82_430), ("wikitext-2", 33_278, 245_569)],
)
def test_word_mode_reproduces_published_setup(name, vocab, test_tokens):
    if not (SHARED_DATA / name / "train.txt").is_file():
        pytest.skip(f"reference corpus not present at {SHARED_DATA / name}")
    corpus = load_corpus(SHARED_DATA / name)
    tokenizer = get_tokenizer(corpus.splits["train"], "word", vocab)
    assert tokenizer.vocab_size == vocab
    test = encode_split(tokenizer, corpus.splits["test"])
    assert len(test.tokens) == test_tokens
    assert test.text_words + test.text_lines == test_tokens  # word ppl == token ppl in word mode
    literal_unks = (SHARED_DATA / name / "test.txt").read_text(encoding="utf-8").split().count("<unk>")
    assert int((np.asarray(test.tokens) == UNK_ID).sum()) == literal_unks  # no test word outside the vocabulary
    inputs, targets = batchify(test.tokens, 10, EOS_ID, pad=True)
    assert int((targets >= 0).sum()) == test_tokens
    assert torch.equal(targets.t().reshape(-1)[:test_tokens], torch.from_numpy(np.asarray(test.tokens, dtype=np.int64)))


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    path = tmp_path / "x.tok"
    write_tokens(path, np.arange(3), 10, text_bytes=1, text_words=1, text_lines=1)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
