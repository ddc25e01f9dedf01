"""Finding and checking text: a directory with train/valid/test, one file, or the built-in corpus.

A corpus is three lists of lines. A line is the text between two newlines, without the newline
(a trailing carriage return is dropped, so CRLF files read like LF files); the tokenizer ends
each line with an end-of-sentence token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmtrain.errors import LmtrainError

SPLITS = ("train", "valid", "test")
BUILTIN = "builtin"  # the source name of the corpus made from CPython's reference documentation


@dataclass(frozen=True)
class Corpus:
    """Lines of each split, and where they came from (an absolute path or BUILTIN)."""

    source: str
    splits: dict[str, list[str]]


def load_corpus(path: Path | None) -> Corpus:
    """Read a corpus: a directory holding train.txt/valid.txt/test.txt, one text file, or None (built-in)."""
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
        splits = {s: read_lines(path / f"{s}.txt") for s in SPLITS}
        return Corpus(str(path.resolve()), splits)
    lines = read_lines(path)
    return Corpus(str(path.resolve()), split_lines(lines, f"corpus file {path}"))


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; raise LmtrainError for anything that is not usable text."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise LmtrainError(f"expected a text file, got a directory: {path}") from None
    except OSError as e:
        raise LmtrainError(f"cannot read {path}: {e.strerror}") from None
    return decode_lines(data, str(path))


def decode_lines(data: bytes, name: str) -> list[str]:
    if not data:
        raise LmtrainError(f"{name} is empty")
    nul = data.find(b"\0")
    if nul >= 0:
        raise LmtrainError(f"{name} looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmtrainError(f"{name} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise LmtrainError(f"{name} holds only whitespace")
    text = text.removeprefix("\ufeff")
    if text.endswith("\n"):
        text = text[:-1]
    return [line.removesuffix("\r") for line in text.split("\n")]


def split_lines(lines: list[str], name: str) -> dict[str, list[str]]:
    """Split one text deterministically into contiguous train (90 %), valid (5 %) and test (5 %) lines.

    Contiguous blocks rather than a shuffle keep documents whole, so valid and test measure
    text the model has not seen in pieces.
    """
    if len(lines) < 3:
        raise LmtrainError(
            f"{name} has {len(lines)} line(s); at least 3 are needed to split it into train/valid/test "
            "(or give a directory with train.txt, valid.txt and test.txt)"
        )
    held_out = max(1, len(lines) // 20)
    n_train = len(lines) - 2 * held_out
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
    return Corpus(BUILTIN, split_lines(lines, "the built-in corpus"))


def text_stats(lines: list[str]) -> tuple[int, int, int, int]:
    """(UTF-8 bytes, whitespace-separated words, lines, characters) of a split; bytes and
    characters count one newline per line."""
    n_bytes = sum(len(line.encode("utf-8")) + 1 for line in lines)
    n_words = sum(len(line.split()) for line in lines)
    n_chars = sum(len(line) + 1 for line in lines)
    return n_bytes, n_words, len(lines), n_chars
