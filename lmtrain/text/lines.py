"""Text as lines, the way a file of it is read for encoding (lmtrain.text.blocks): split at `\\n`, a
trailing `\\r` dropped, no empty line after a final line end, the byte order mark of a file's
start dropped. For `lmtrain score`, which reads its input a line at a time (a pipe is scored as
it comes), and for texts given as strings (the Python API)."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import BinaryIO

from lmtrain.errors import LmtrainError
from lmtrain.text.corpus import BOM


def text_lines(text: str) -> list[str]:
    """The lines of `text` as a file holding it is read: "a\\nb\\n" and "a\\r\\nb" are ["a", "b"]."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def stream_lines(f: BinaryIO, name: str, errors: str = "strict") -> Iterator[str]:
    """The lines of an open binary file, read one at a time (so a pipe's lines come as they are
    written), as `text_lines` cuts them. errors: strict (bytes that are not UTF-8 are an error
    naming the line) or replace (U+FFFD)."""
    for number, raw in enumerate(f, 1):
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        try:
            yield codecs.utf_8_decode(raw, errors, True)[0]
        except UnicodeDecodeError as e:
            raise LmtrainError(f"{name}: line {number:,} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                               f"{e.start + 1:,} of the line); fix the file or read it with --encoding-errors replace") from None
