"""Corpus -> tokenizer -> token files, each cached by content hash so a second run reuses them.

The cache lives in $LMTRAIN_CACHE, or ~/.cache/lmtrain when that is unset:

    tokenizers/<sha256 of kind, vocab size, sample size and the training text's digest>.model
    tokens/<sha256 of tokenizer model and the split's digest>.tok

A text's digest is the sha256 of its file's bytes, taken while the corpus is checked
(lmtrain.text.corpus), so no key needs the text in memory.

An entry is trusted only once checked. A token file records the digests of the text and the
tokenizer it was made from and of its own ids (lmtrain.text.tokens), and is opened only if its size,
header, id range and the three digests agree with what the key stands for; a cached tokenizer
must load and be of the kind and vocabulary asked for. A bad entry (cut short, from another
tokenizer or text, made by an older lmtrain) is encoded again, with one warning line on stderr,
never used. The corpus is hashed again once a split is encoded; if it changed meanwhile, that
entry is dropped and the command stops with one line.

Entries are written atomically (a `.part` file renamed into place) by one process at a time:
each holds the entry's lock (`<key>.lock`, an flock the kernel releases when its holder dies)
while it checks and writes the entry, and a second process encoding the same split waits (one
note on stderr), then reuses the first one's entry. A `.part` left by a killed process is
removed when the cache is next opened, once its entry's lock is free (a live writer holds it).

If the cache cannot be written (read-only, or the disk full), everything still works, only
without reuse: the split is encoded into an unnamed temporary file instead, with one warning
line; only when that fails too is it an error.

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
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import sentencepiece

from lmtrain.atomic import atomic_open
from lmtrain.config import TokenizerConfig
from lmtrain.errors import LmtrainError
from lmtrain.locks import exclusive
from lmtrain.progress import QuietProgress
from lmtrain.text import corpus
from lmtrain.text.blocks import Block, block_pieces, read_blocks, text_pieces
from lmtrain.text.corpus import Text, TextStats, as_text, still_the_same
from lmtrain.text.tokenizer import EOS, EOS_ID, UNK, UNK_ID, Tokenizer, train_tokenizer
from lmtrain.text.tokens import VERSION as TOKENS_VERSION, TokenFile, TokenWriter, read_tokens, token_dtype

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
    with cache_entry(path) as writable:
        if path.is_file():
            cached, problem = cached_tokenizer(path, kind, vocab_size)
            if cached is not None:
                return cached
            warn(f"warning: the cached tokenizer {path} is damaged ({problem}); training it again")
        with (progress or QuietProgress()).bytes_bar(text.size, f"sampling {text.name}") as bar:
            tokenizer = train_tokenizer(sampled_pieces(text, bar), kind, vocab_size, sample_lines)
        if writable:
            try_write(path, tokenizer.model_proto)
    return tokenizer


def cached_tokenizer(path: Path, kind: str, vocab_size: int) -> tuple[Tokenizer | None, str]:
    """(the tokenizer in `path`, "") if it loads and is what its key asks for, else (None, why not)."""
    try:
        model = path.read_bytes()
        tokenizer = Tokenizer(model, kind)
    except (OSError, RuntimeError, TypeError, ValueError) as e:
        return None, f"sentencepiece cannot load it: {str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__}"
    spec = trainer_spec(model)
    wanted = {3: MODEL_TYPES[kind], 4: vocab_size}
    if any(spec.get(field) != value for field, value in wanted.items()):
        return None, (f"it is a {MODEL_NAMES.get(spec.get(3), 'unknown')} model of vocabulary {spec.get(4)}, "
                      f"not a {kind} one of {vocab_size}")
    if tokenizer.vocab_size > vocab_size or tokenizer.sp.id_to_piece(UNK_ID) != UNK or tokenizer.sp.id_to_piece(EOS_ID) != EOS:
        return None, "its pieces are not those lmtrain trains"
    return tokenizer, ""


MODEL_TYPES = {"unigram": 1, "bpe": 2, "word": 3, "char": 4}  # sentencepiece's TrainerSpec.ModelType
MODEL_NAMES = {number: name for name, number in MODEL_TYPES.items()}


def trainer_spec(model: bytes) -> dict[int, int]:
    """The integer fields of a sentencepiece model's TrainerSpec (field 2 of ModelProto), by field
    number (3: model type, 4: vocabulary size); read from the protobuf wire format directly, as
    sentencepiece's Python module does not expose them. {} when the bytes do not parse."""
    def varint(data: bytes, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            value |= (byte & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not byte & 0x80:
                return value, i

    def fields(data: bytes):
        i = 0
        while i < len(data):
            tag, i = varint(data, i)
            wire = tag & 7
            if wire == 0:
                value, i = varint(data, i)
            elif wire == 2:
                n, i = varint(data, i)
                value, i = data[i : i + n], i + n
            elif wire in (1, 5):
                value, i = None, i + (8 if wire == 1 else 4)
            else:
                return
            yield tag >> 3, value

    try:
        spec = next((value for number, value in fields(model) if number == 2 and isinstance(value, bytes)), b"")
        return {number: value for number, value in fields(spec) if isinstance(value, int)}
    except IndexError:
        return {}


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
    with cache_entry(path) as writable:
        if path.is_file():
            cached, problem = cached_tokens(path, tokenizer, text)
            if cached is not None:
                return cached
            warn(f"warning: the cached token file {path} is stale or damaged ({problem}); encoding again")
        if writable:
            try:
                with atomic_open(path, before_replace=lambda: check_unchanged(text)) as f:
                    write_encoded(tokenizer, text, f, workers, progress)
                return read_tokens(path)
            except OSError as e:
                warn(f"warning: cannot write the token file {path} ({e.strerror}); encoding {text.name} into "
                     "a temporary file instead, without reuse (free some space, or set LMTRAIN_CACHE)")
    try:  # no cache: an unnamed temporary file, gone once the memmap is
        with tempfile.TemporaryFile() as f:
            write_encoded(tokenizer, text, f, workers, progress)
            f.flush()
            check_unchanged(text)
            return read_tokens(f)
    except OSError as e:
        raise LmtrainError(f"cannot write a temporary token file: {e.strerror} (set LMTRAIN_CACHE to a writable directory with space)") from None


def cached_tokens(path: Path, tokenizer: Tokenizer, text: Text) -> tuple[TokenFile | None, str]:
    """(the token file at `path`, "") when it is the encoding of `text` by `tokenizer`, whole;
    else (None, why not). Reads its ids once (their range and digest)."""
    try:
        tokens = read_tokens(path)
    except LmtrainError as e:
        return None, str(e).replace(f"{path}: ", "").replace(str(path), "it")
    vocab_size = tokenizer.vocab_size
    if tokens.version < TOKENS_VERSION:
        return None, f"written by an older lmtrain, token file version {tokens.version}"
    if tokens.vocab_size != vocab_size:
        return None, f"its vocabulary is {tokens.vocab_size}, the tokenizer's {vocab_size}"
    if tokens.tokenizer_digest != model_digest(tokenizer):
        return None, "made by another tokenizer"
    if tokens.text_digest != text.digest:
        return None, "made from another text"
    largest, ids_digest = tokens.scan_ids()
    if largest >= vocab_size:
        return None, f"it holds id {largest}, outside the vocabulary of {vocab_size}"
    if ids_digest != tokens.ids_digest:
        return None, "its ids are not those it was written with"
    return tokens, ""


def model_digest(tokenizer: Tokenizer) -> str:
    """The tokenizer's identity in a token file: the sha256 of its model's bytes."""
    return hashlib.sha256(tokenizer.model_proto).hexdigest()


def check_unchanged(text: Text) -> None:
    """Raise LmtrainError when `text`'s file changed since it was checked (and hashed for the key)."""
    if not still_the_same(text):
        raise LmtrainError(f"{text.name} changed while it was being encoded; its token file was not kept "
                           "(run again once the corpus stays unchanged)")


@contextmanager
def cache_entry(path: Path) -> Iterator[bool]:
    """Hold the lock of the cache entry `path` while the block checks and writes it; yields
    whether the cache can be written. First removes the `.part` files killed writers left in
    its folder. Without a writable cache, or when the lock cannot be made, the block runs
    unlocked and must not write the entry."""
    if not writable_dir(path.parent):
        yield False
        return
    remove_stale_parts(path.parent)
    lock = ExitStack()
    try:
        lock.enter_context(exclusive(entry_lock(path), f"the cache entry {path}", wait=lambda line: warn(f"note: {line}")))
    except (LmtrainError, OSError) as e:
        warn(f"warning: cannot lock the cache entry {path} ({e.strerror if isinstance(e, OSError) else e}); "
             "working without the cache")
        yield False
        return
    with lock:
        yield True


def entry_lock(path: Path) -> Path:
    return path.with_suffix(".lock")


def remove_stale_parts(folder: Path) -> None:
    """Remove the `.part` files (see lmtrain.atomic) of entries no process is writing.

    A part is only ever written under its entry's lock; so once this process holds that lock,
    any part of the entry that existed before is a leftover (its writer renamed it, or died).
    A part whose entry is locked is being written now, and stays."""
    for part in folder.glob(".*.part"):
        entry = folder / part.name[1:].rsplit(".", 2)[0]  # .<entry>.<random>.part
        try:
            with exclusive(entry_lock(entry), f"the cache entry {entry}"):
                part.unlink(missing_ok=True)
        except (LmtrainError, OSError):
            pass  # being written now, or not ours to remove


def warn(message: str) -> None:
    """One line on stderr (looked up at call time, so the CLI's and the tests' captures see it)."""
    print(message, file=sys.stderr, flush=True)


def encode_corpus(tokenizer: Tokenizer, splits: dict[str, Text], progress=None) -> dict[str, TokenFile]:
    return {name: encode_split(tokenizer, text, progress=progress) for name, text in splits.items()}


def encode_in_memory(tokenizer: Tokenizer, lines: list[str]) -> TokenFile:
    """The token file of `lines` held in memory, written nowhere: the ids encode_split gives for a
    file of these lines, and the text's sizes, for scoring a text of a few lines (the Python API,
    `lmtrain score`) without a cache entry per call."""
    text = as_text(lines)
    parts, total = [], TextStats()
    for ids, stats, _ in encoded_blocks(tokenizer, text, workers=1):
        parts.append(ids)
        total += stats
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return TokenFile(ids, tokenizer.vocab_size, total.bytes, total.words, total.lines, total.chars)


def write_encoded(tokenizer: Tokenizer, text: Text, f, workers: int | None, progress) -> TextStats:
    """Encode `text` into an open binary file as a token file; returns the text's TextStats."""
    writer = TokenWriter(f, tokenizer.vocab_size, text.digest, model_digest(tokenizer))
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
    init = (tokenizer.model_proto, tokenizer.kind, text.errors, text.name, corpus.LONG_LINE_BYTES)
    context = worker_context()
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


def worker_context() -> multiprocessing.context.BaseContext:
    """Where encoding workers come from: a fork server, itself started single-threaded, with this
    module imported once. A plain fork copies whatever locks the parent's other threads (torch's,
    a progress bar's) hold at that instant, and a worker could wait on one forever (one did, in a
    CI run); spawn would re-run the parent's __main__ (the CLI, torch) in each."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def default_workers() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Each worker process holds one tokenizer and the text's decoding settings, set once by
# `start_worker` (a Pool initializer), so blocks travel without them.
WORKER: dict = {}


def start_worker(model_proto: bytes, kind: str, errors: str, name: str, long_line: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    WORKER.update(tokenizer=Tokenizer(model_proto, kind), errors=errors, name=name, long_line=long_line)


def encode_in_worker(block: Block) -> tuple[np.ndarray, TextStats, int]:
    tokenizer = WORKER["tokenizer"]
    pieces, continued, stats = block_pieces(block, WORKER["errors"], WORKER["name"], WORKER["long_line"])
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
        with atomic_open(path) as f:
            f.write(data)
    except OSError:
        pass
