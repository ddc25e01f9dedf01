"""Corpus -> tokenizer -> token files, each cached by content hash so a second run reuses them.

The cache lives in $LMTRAIN_CACHE, or ~/.cache/lmtrain when that is unset:

    tokenizers/<sha256 of kind, vocab size, sample size and the training text's digest>.model
    tokens/<sha256 of tokenizer model and the split's digest>.tok

A text's digest is the sha256 of its file's bytes, taken while the corpus is checked
(lmtrain.corpus), so no key needs the text in memory. Entries are written atomically, so an
interrupted run never leaves a half-written one. If the cache cannot be written, everything still
works, only without reuse.

Encoding streams: the main process reads blocks of whole lines, a pool of worker processes (each
holding the sentencepiece model, loaded once) encodes them, and the main process writes the ids
to the token file in order as they come back, with at most a few blocks in flight:

    file ─ read_blocks ─▶ [worker: decode, split, encode] ×N ─▶ ids in order ─▶ TokenWriter
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import tempfile
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import sentencepiece

from lmtrain.atomic import atomic_open
from lmtrain.config import TokenizerConfig
from lmtrain import corpus
from lmtrain.corpus import Block, Text, TextStats, as_text, block_pieces, read_blocks, text_pieces
from lmtrain.errors import LmtrainError
from lmtrain.progress import QuietProgress
from lmtrain.tokenizer import Tokenizer, train_tokenizer
from lmtrain.tokens import TokenFile, TokenWriter, read_tokens, token_dtype

# bump when tokenizer training or encoding changes. 3: keys from the files' bytes; long lines in
# pieces; the tokenizer's training sample drawn by lmtrain (seeded) instead of sentencepiece
CACHE_VERSION = "3"
BLOCKS_IN_FLIGHT = 2  # per worker: one being encoded, one waiting, so no worker idles on the reader


def cache_dir() -> Path:
    return Path(os.environ.get("LMTRAIN_CACHE") or Path.home() / ".cache" / "lmtrain")


def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()


def get_tokenizer(text: Text | list[str], kind: str, vocab_size: int,
                  sample_lines: int = TokenizerConfig.sample_lines, progress=None) -> Tokenizer:
    """The tokenizer trained on a sample of `text` (the training split), from the cache when one
    was trained on the same text with the same settings. `progress` shows the sampling pass."""
    text = as_text(text)
    key = digest(CACHE_VERSION, sentencepiece.__version__, kind, str(vocab_size), str(sample_lines), text.digest)
    path = cache_dir() / "tokenizers" / f"{key}.model"
    if path.is_file():
        return Tokenizer(path.read_bytes(), kind)
    with (progress or QuietProgress()).bytes_bar(text.size, f"sampling {text.name}") as bar:
        tokenizer = train_tokenizer(sampled_pieces(text, bar), kind, vocab_size, sample_lines)
    try_write(path, tokenizer.model_proto)
    return tokenizer


def sampled_pieces(text: Text, bar) -> Iterator[str]:
    """Every piece of `text` (lines, or pieces of long ones: the tokenizer's sampling unit)."""
    for pieces, _, _, n_bytes in text_pieces(text):
        yield from pieces
        bar.update(n_bytes)


def encode_split(tokenizer: Tokenizer, text: Text | list[str], workers: int | None = None,
                 progress=None) -> TokenFile:
    """The token file of `text`, from the cache when this tokenizer already encoded this text.

    workers: encoding processes (default: the CPUs this process may use); `progress` (see
    lmtrain.progress) shows the bytes encoded. A text of one block or less, or held in memory,
    is encoded in this process; the token file is the same either way.
    """
    text = as_text(text)
    progress = progress or QuietProgress()
    key = digest(CACHE_VERSION, tokenizer.kind, tokenizer.model_proto, text.digest)
    path = cache_dir() / "tokens" / f"{key}.tok"
    if path.is_file():
        return read_tokens(path)
    if writable_dir(path.parent):
        try:
            with atomic_open(path) as f:
                write_encoded(tokenizer, text, f, workers, progress)
        except OSError as e:
            raise LmtrainError(f"cannot write the token file {path}: {e.strerror} (set LMTRAIN_CACHE to a directory with space)") from None
        return read_tokens(path)
    try:  # no cache: an unnamed temporary file, gone once the memmap is
        with tempfile.TemporaryFile() as f:
            write_encoded(tokenizer, text, f, workers, progress)
            f.flush()
            return read_tokens(f)
    except OSError as e:
        raise LmtrainError(f"cannot write a temporary token file: {e.strerror} (set LMTRAIN_CACHE to a writable directory)") from None


def encode_corpus(tokenizer: Tokenizer, splits: dict[str, Text], progress=None) -> dict[str, TokenFile]:
    return {name: encode_split(tokenizer, text, progress=progress) for name, text in splits.items()}


def write_encoded(tokenizer: Tokenizer, text: Text, f, workers: int | None, progress) -> TextStats:
    """Encode `text` into an open binary file as a token file; returns the text's TextStats."""
    writer = TokenWriter(f, tokenizer.vocab_size)
    total = TextStats()
    with progress.bytes_bar(text.size, f"encoding {text.name}") as bar:
        for ids, stats, n_bytes in encoded_blocks(tokenizer, text, workers):
            writer.write(ids)
            total += stats
            bar.update(n_bytes)
    writer.finish(*total)
    return total


def encoded_blocks(tokenizer: Tokenizer, text: Text, workers: int | None) -> Iterator[tuple[np.ndarray, TextStats, int]]:
    """(ids, TextStats, bytes read) of each block of `text`, in order."""
    workers = workers or default_workers()
    if text.lines is not None or workers <= 1 or text.size <= corpus.BLOCK_BYTES:
        for pieces, continued, stats, n_bytes in text_pieces(text):
            yield tokenizer.encode_pieces(pieces, continued), stats, n_bytes
        return
    # fork: the workers start at once and share the parent's pages; spawn would re-run the
    # parent's __main__ (the CLI, torch) in each
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    init = (tokenizer.model_proto, tokenizer.kind, text.errors, text.name)
    with context.Pool(workers, initializer=start_worker, initargs=init) as pool:
        # not pool.imap: its feeder thread reads the whole input ahead into the task queue when
        # the workers are slower than the reader; a bounded queue of results keeps memory flat
        pending: deque = deque()
        for block in read_blocks(text):
            pending.append(pool.apply_async(encode_in_worker, (block,)))
            if len(pending) >= BLOCKS_IN_FLIGHT * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def default_workers() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Each worker process holds one tokenizer and the text's decoding settings, set once by
# `start_worker` (a Pool initializer), so blocks travel without them.
WORKER: dict = {}


def start_worker(model_proto: bytes, kind: str, errors: str, name: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    WORKER.update(tokenizer=Tokenizer(model_proto, kind), errors=errors, name=name)


def encode_in_worker(block: Block) -> tuple[np.ndarray, TextStats, int]:
    tokenizer = WORKER["tokenizer"]
    pieces, continued, stats = block_pieces(block, WORKER["errors"], WORKER["name"])
    ids = tokenizer.encode_pieces(pieces, continued).astype(token_dtype(tokenizer.vocab_size))  # half the bytes back
    return ids, stats, len(block.data)


def writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def try_write(path: Path, data: bytes) -> None:
    """Write `data` atomically to `path`, or do nothing when the cache is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            f.write(data)
    except OSError:
        pass
