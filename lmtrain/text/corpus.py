"""Finding and checking text: a directory with train/valid/test, one file, or the built-in corpus.

Each split is a `Text`: a byte range of a UTF-8 file (or, for the built-in corpus, lines held in
memory). Loading a corpus checks and hashes every file in one streaming pass; encoding reads it
again block by block (lmtrain.text.blocks), so no file is ever held whole, whatever its size.

A line is the text between two newlines, without the newline (a trailing carriage return is
dropped, so CRLF files read like LF files); the tokenizer ends each line with an end-of-sentence
token. A line longer than LONG_LINE_BYTES goes to the tokenizer in pieces (lmtrain.text.blocks).
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmtrain.errors import LmtrainError

SPLITS = ("train", "valid", "test")
BUILTIN = "builtin"  # the source name of the corpus made from CPython's reference documentation
ENCODING_ERRORS = ("strict", "replace")  # what reading does with bytes that are not UTF-8: stop, or U+FFFD
# bytes read, checked and encoded at a time: large enough that the per-block costs (a read, a
# pickle to a worker and back, one sentencepiece call) vanish, small enough that several blocks
# in flight per worker stay a few MB
BLOCK_BYTES = 1 << 20
# longer lines go to the tokenizer in pieces: sentencepiece's time and memory per sentence grow
# faster than its length (a text8-style file is one 100 MB line), and a piece is also the unit of
# the tokenizer's training sample. Real prose lines are far shorter, so they are never cut.
LONG_LINE_BYTES = 1 << 16
BOM = codecs.BOM_UTF8


class TextStats(NamedTuple):
    """Size of a text: UTF-8 bytes, whitespace-separated words, lines, characters; bytes and
    characters count one newline per line (so CRLF and LF files measure the same)."""

    bytes: int = 0
    words: int = 0
    lines: int = 0
    chars: int = 0

    def __add__(self, other: TextStats) -> TextStats:  # type: ignore[override]
        return TextStats(*(a + b for a, b in zip(self, other)))


@dataclass(frozen=True)
class Text:
    """One split: bytes [start, stop) of a checked UTF-8 file, or lines in memory (`lines`).

    `digest` identifies the content for cache keys; `len(text)` is its number of lines.
    """

    name: str  # for messages: the file, and which part of it
    digest: str
    line_count: int
    path: Path | None = None
    start: int = 0
    stop: int = 0
    errors: str = "strict"  # one of ENCODING_ERRORS
    lines: list[str] | None = None

    def __len__(self) -> int:
        return self.line_count

    @property
    def size(self) -> int:
        """Bytes of the file range (0 for lines in memory)."""
        return self.stop - self.start


@dataclass(frozen=True)
class Corpus:
    """The text of each split, and where it came from (an absolute path or BUILTIN)."""

    source: str
    splits: dict[str, Text]


def load_corpus(path: Path | None, errors: str = "strict") -> Corpus:
    """Find and check a corpus: a directory holding train.txt/valid.txt/test.txt, one text file
    (split 90/5/5 by lines), or None (built-in). `errors`: see ENCODING_ERRORS."""
    if path is None:
        return builtin_corpus()
    if not path.exists():
        raise LmtrainError(f"corpus not found: {path}")
    if path.is_dir():
        missing = [f"{s}.txt" for s in SPLITS if not (path / f"{s}.txt").is_file()]
        if missing:
            raise LmtrainError(
                f"corpus directory {path} lacks {', '.join(missing)} "
                "(expected train.txt, valid.txt and test.txt, or give a single text file)"
            )
        return Corpus(str(path.resolve()), {s: load_text(path / f"{s}.txt", errors) for s in SPLITS})
    if not path.is_file():
        raise LmtrainError(f"corpus {path} is not a regular file (a pipe or a device?): a corpus is read more than once, "
                           "so save it to a file first")
    return Corpus(str(path.resolve()), split_file(path, scan_file(path, errors), errors))


def load_text(path: Path, errors: str = "strict") -> Text:
    """A whole text file, checked (see `scan_file`)."""
    scan = scan_file(path, errors)
    return Text(str(path), scan.digest, scan.line_count, path, 0, scan.size, errors)


def lines_text(lines: list[str], name: str = "text") -> Text:
    """Lines in memory as a Text (the built-in corpus; callers that already hold their lines)."""
    h = hashlib.sha256(b"lines\0")
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return Text(name, h.hexdigest(), len(lines), lines=lines)


def as_text(text: Text | list[str]) -> Text:
    return text if isinstance(text, Text) else lines_text(text)


# --- checking a file: one streaming pass ------------------------------------------------------


@dataclass(frozen=True)
class FileScan:
    """What one pass over a file learns: its size, sha256, lines, and the lines before each block
    (so that the offset of any line is found by reading one block)."""

    size: int
    digest: str
    line_count: int
    block_starts: list[int]  # byte offset of each BLOCK_BYTES block
    lines_before: list[int]  # newlines before each of those offsets


def scan_file(path: Path, errors: str = "strict") -> FileScan:
    """Check that `path` is usable text (not empty, not binary, UTF-8 unless errors='replace',
    not only whitespace) and hash and count it, reading it once in blocks."""
    h = hashlib.sha256()
    starts: list[int] = []
    before: list[int] = []
    offset = newlines = 0
    pending = b""  # an incomplete UTF-8 sequence at the end of the last block
    has_text = False
    last = b""
    with open_text_file(path) as f:
        while block := read_or_fail(f, BLOCK_BYTES, path):
            starts.append(offset)
            before.append(newlines)
            h.update(block)
            nul = block.find(b"\0")
            if nul >= 0:
                raise LmtrainError(f"{path} looks binary (NUL byte at offset {offset + nul}); expected UTF-8 text")
            text, pending = decode(pending + block, offset - len(pending), errors, str(path), final=False)
            has_text = has_text or bool(without_bom(text, offset - len(pending)).strip())
            newlines += block.count(b"\n")
            offset += len(block)
            last = block[-1:]
    decode(pending, offset - len(pending), errors, str(path), final=True)
    if offset == 0:
        raise LmtrainError(f"{path} is empty")
    if not has_text:
        with open_text_file(path) as f:
            bom = read_or_fail(f, len(BOM), path) == BOM
        if not bom:
            raise LmtrainError(f"{path} holds only whitespace")
        raise LmtrainError(f"{path} holds no text, only a UTF-8 byte order mark"
                           + ("" if offset == len(BOM) else " and whitespace"))
    lines = newlines + (last != b"\n")  # a last line without a newline still counts
    return FileScan(offset, h.hexdigest(), lines, starts, before)


def without_bom(text: str, offset: int) -> str:
    """`text`, decoded from file offset `offset`, without the byte order mark that starts a file:
    reading drops it (`lmtrain.text.blocks.read_blocks`), so a file of a BOM and nothing else holds no text."""
    return text[1:] if offset == 0 and text.startswith("\ufeff") else text


def open_text_file(path: Path):
    try:
        return open(path, "rb")
    except IsADirectoryError:
        raise LmtrainError(f"expected a text file, got a directory: {path}") from None
    except OSError as e:
        raise LmtrainError(f"cannot read {path}: {e.strerror}") from None


def copy_stream(path: Path, into) -> None:
    """Copy a file that can be read only once (a pipe, a FIFO, /dev/stdin) into the open binary
    file `into`, in blocks; binary input (a NUL byte: /dev/zero, say) stops it at once."""
    offset = 0
    try:
        with open_text_file(path) as f:
            while block := read_or_fail(f, BLOCK_BYTES, path):
                nul = block.find(b"\0")
                if nul >= 0:
                    raise LmtrainError(f"{path} looks binary (NUL byte at offset {offset + nul}); expected UTF-8 text")
                into.write(block)
                offset += len(block)
        into.flush()
    except OSError as e:  # a full disk
        raise LmtrainError(f"cannot copy {path} to the temporary file {into.name}: {e.strerror or e}") from None


def read_or_fail(f, size: int, path: Path) -> bytes:
    try:
        return f.read(size)
    except OSError as e:
        raise LmtrainError(f"cannot read {path}: {e.strerror}") from None


def decode(data: bytes, offset: int, errors: str, name: str, final: bool = True) -> tuple[str, bytes]:
    """UTF-8 `data` (found at byte `offset` of `name`) as text, and the incomplete sequence at its
    end that waits for the next block (none when `final`)."""
    try:
        text, used = codecs.utf_8_decode(data, errors, final)
    except UnicodeDecodeError as e:
        raise LmtrainError(
            f"{name} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {offset + e.start}); "
            "fix the file or read it with --encoding-errors replace"
        ) from None
    return text, data[used:]


# --- the 90/5/5 split of one file ---------------------------------------------------------------


def split_sizes(n_lines: int, name: str) -> tuple[int, int]:
    """(train lines, valid lines = test lines) of a text split 90/5/5 by lines."""
    if n_lines < 3:
        raise LmtrainError(
            f"{name} has {n_lines} line(s); at least 3 are needed to split it into train/valid/test "
            "(or give a directory with train.txt, valid.txt and test.txt)"
        )
    held_out = max(1, n_lines // 20)
    return n_lines - 2 * held_out, held_out


def split_file(path: Path, scan: FileScan, errors: str) -> dict[str, Text]:
    """Split one checked file deterministically into contiguous train (90 %), valid (5 %) and test
    (5 %) line ranges, without reading it whole: the scan counted the lines, and each boundary's
    byte offset is found by reading the one block it lies in.

    Contiguous blocks rather than a shuffle keep documents whole, so valid and test measure text
    the model has not seen in pieces.
    """
    name = f"corpus file {path}"
    n_train, held_out = split_sizes(scan.line_count, name)
    first = [0, n_train, n_train + held_out, scan.line_count]
    offsets = [0, line_offset(path, scan, first[1]), line_offset(path, scan, first[2]), scan.size]
    splits = {}
    for i, split in enumerate(SPLITS):
        digest = part_digest(scan.digest, offsets[i], offsets[i + 1])
        text = Text(f"{path} (lines {first[i] + 1}-{first[i + 1]}, its {split} part)", digest,
                    first[i + 1] - first[i], path, offsets[i], offsets[i + 1], errors)
        if not has_text(text):
            raise LmtrainError(f"{name}: its {split} part (by the 90/5/5 line split) holds only whitespace")
        splits[split] = text
    return splits


def part_digest(file_digest: str, start: int, stop: int) -> str:
    """The digest of bytes [start, stop) of a file, from the digest of the whole file."""
    return hashlib.sha256(f"{file_digest} bytes {start}-{stop}".encode()).hexdigest()


def still_the_same(text: Text) -> bool:
    """Whether `text`'s file still holds what it held when checked: its bytes hashed again (a
    text in memory cannot change). For a split part the whole file is hashed, as its digest was."""
    if text.path is None:
        return True
    h = hashlib.sha256()
    try:
        with open(text.path, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                h.update(block)
    except OSError:
        return False
    whole = h.hexdigest()
    return text.digest in (whole, part_digest(whole, text.start, text.stop))


def line_offset(path: Path, scan: FileScan, line: int) -> int:
    """Byte offset where line number `line` (0-based, 0 < line < line_count) starts."""
    i = bisect.bisect_left(scan.lines_before, line) - 1  # the block holding the line-th newline
    with open_text_file(path) as f:
        f.seek(scan.block_starts[i])
        block = read_or_fail(f, BLOCK_BYTES, path)
    newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == ord("\n"))
    return scan.block_starts[i] + int(newlines[line - scan.lines_before[i] - 1]) + 1


def has_text(text: Text) -> bool:
    """Whether a file range holds anything but whitespace (reads only until it finds some)."""
    with open_text_file(text.path) as f:
        f.seek(text.start)
        pending, offset = b"", text.start
        while offset < text.stop:
            block = read_or_fail(f, min(BLOCK_BYTES, text.stop - offset), text.path)
            if not block:
                break
            decoded, pending = decode(pending + block, offset - len(pending), text.errors, text.name, final=False)
            if without_bom(decoded, offset - len(pending)).strip():
                return True
            offset += len(block)
    return False


# --- the built-in corpus ----------------------------------------------------------------------


def split_lines(lines: list[str], name: str) -> dict[str, list[str]]:
    """`split_file` for lines in memory: the same 90/5/5 rule."""
    n_train, held_out = split_sizes(len(lines), name)
    splits = {
        "train": lines[:n_train],
        "valid": lines[n_train : n_train + held_out],
        "test": lines[n_train + held_out :],
    }
    for split, part in splits.items():
        if not any(line.strip() for line in part):
            raise LmtrainError(f"{name}: its {split} part (by the 90/5/5 line split) holds only whitespace")
    return splits


def builtin_corpus() -> Corpus:
    """English prose and examples from CPython's reference documentation (`pydoc_data.topics`).

    It ships with every CPython, so the demo needs no download. Topics are taken in sorted order
    and blank lines dropped; the result is split 90/5/5 like any single file.
    """
    from pydoc_data.topics import topics

    lines = [line for key in sorted(topics) for line in topics[key].split("\n") if line.strip()]
    parts = split_lines(lines, "the built-in corpus")
    return Corpus(BUILTIN, {split: lines_text(part, f"the built-in corpus ({split} part)") for split, part in parts.items()})


# --- reading a text in blocks and pieces --------------------------------------------------------


