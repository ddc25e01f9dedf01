"""The encoding benchmark's plumbing on a tiny corpus: the generated text and one measured encode."""

from __future__ import annotations

import collections

from lmtrain.tools.bench_encode import VOCAB_WORDS, encode, generate, make_vocabulary, train_model


def test_generated_corpus_is_deterministic_zipfian_whole_lines(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    generate(a, 300_000, seed=1)
    generate(b, 300_000, seed=1)
    data = a.read_bytes()
    assert data == b.read_bytes() and len(data) >= 300_000 and data.endswith(b".\n")
    lines = data.decode().splitlines()
    lengths = [len(line.split()) for line in lines]
    assert min(lengths) >= 1 and max(lengths) <= 60 and 15 < sum(lengths) / len(lines) < 30
    counts = collections.Counter(data.replace(b".", b"").split()).most_common()
    # Zipf: the top word is far more frequent than the 100th, and many distinct words appear
    assert counts[0][1] > 20 * counts[99][1] and len(counts) > 5000


def test_vocabulary_is_distinct_words():
    import numpy as np

    words = make_vocabulary(VOCAB_WORDS, np.random.default_rng(0))
    assert len(set(words)) == VOCAB_WORDS and all(w.isalpha() for w in words)


def test_encode_record(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    generate(corpus, 200_000, seed=2)
    model = tmp_path / "m.model"
    train_model(corpus, model)
    record = encode(corpus, model, workers=1)
    assert record["tokens"] > len(corpus.read_bytes().splitlines())  # at least one token and one <eos> a line
    assert record["encode_mb_s"] > 0 and record["sampled_peak_rss_sum_mb"] > 0
