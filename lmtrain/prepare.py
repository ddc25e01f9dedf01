"""Corpus -> tokenizer -> token files, each cached by content hash so a second run reuses them.

The cache lives in $LMTRAIN_CACHE, or ~/.cache/lmtrain when that is unset:

    tokenizers/<sha256 of kind, vocab size and training text>.model
    tokens/<sha256 of tokenizer model and split text>.tok

Entries are written atomically, so an interrupted run never leaves a half-written one. If the
cache cannot be written, everything still works, only without reuse.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import sentencepiece

from lmtrain.atomic import atomic_open
from lmtrain.corpus import text_stats
from lmtrain.tokenizer import Tokenizer, train_tokenizer
from lmtrain.tokens import TokenFile, read_tokens, write_tokens

CACHE_VERSION = "2"  # bump when tokenizer training or encoding changes


def cache_dir() -> Path:
    return Path(os.environ.get("LMTRAIN_CACHE") or Path.home() / ".cache" / "lmtrain")


def lines_digest(*parts: bytes | str, lines: list[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def get_tokenizer(train_lines: list[str], kind: str, vocab_size: int) -> Tokenizer:
    """The tokenizer trained on `train_lines`, from the cache when one was trained on the same text."""
    key = lines_digest(CACHE_VERSION, sentencepiece.__version__, kind, str(vocab_size), lines=train_lines)
    path = cache_dir() / "tokenizers" / f"{key}.model"
    if path.is_file():
        return Tokenizer(path.read_bytes(), kind)
    tokenizer = train_tokenizer(train_lines, kind, vocab_size)
    try_write(path, tokenizer.model_proto)
    return tokenizer


def encode_split(tokenizer: Tokenizer, lines: list[str]) -> TokenFile:
    """The token file of `lines`, from the cache when this tokenizer already encoded this text."""
    key = lines_digest(CACHE_VERSION, tokenizer.kind, tokenizer.model_proto, lines=lines)
    path = cache_dir() / "tokens" / f"{key}.tok"
    if path.is_file():
        return read_tokens(path)
    tokens = tokenizer.encode_lines(lines)
    stats = text_stats(lines)
    try:
        write_tokens(path, tokens, tokenizer.vocab_size, *stats)
        return read_tokens(path)
    except OSError:
        return TokenFile(tokens, tokenizer.vocab_size, *stats)


def try_write(path: Path, data: bytes) -> None:
    """Write `data` atomically to `path`, or do nothing when the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            f.write(data)
    except OSError:
        pass


def encode_corpus(tokenizer: Tokenizer, splits: dict[str, list[str]]) -> dict[str, TokenFile]:
    return {name: encode_split(tokenizer, lines) for name, lines in splits.items()}
