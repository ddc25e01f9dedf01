"""Reading a Text for encoding, in bounded memory: blocks of whole lines, and lines as tokenizer pieces.

    file ─ read_blocks ─▶ Block (~1 MB of whole lines) ─ block_pieces ─▶ pieces, line ends, TextStats
                          (in the main process)                          (in an encoding worker)

A line longer than corpus.LONG_LINE_BYTES goes to the tokenizer in pieces (see `first_cut`), the
end-of-sentence token only after its last piece. The sizes are read from lmtrain.text.corpus when
a function is called (tests set smaller ones there)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lmtrain.text import corpus
from lmtrain.text.corpus import BOM, Text, TextStats, decode, open_text_file, read_or_fail


@dataclass(frozen=True)
class Block:
    """Bytes of whole lines of a file, or the head of a line too long to take whole."""

    data: bytes
    offset: int  # file offset of data[0], for messages
    open_end: bool = False  # data is the head of a line that goes on in the next block
    split_words: int = 0  # 1 when that head was cut through a word (which split() then counts twice)


def read_blocks(text: Text, block_bytes: int | None = None, long_line: int | None = None) -> Iterator[Block]:
    """Cut a file range into blocks of whole lines, about `block_bytes` each; a line that grows
    past `long_line` bytes without a newline comes as head blocks (`open_end`), so memory stays
    bounded however long the line (None: corpus.BLOCK_BYTES and LONG_LINE_BYTES, looked up when called so
    that tests can make them small). The byte order mark at the start of a file is dropped."""
    block_bytes, long_line = block_bytes or corpus.BLOCK_BYTES, long_line or corpus.LONG_LINE_BYTES
    with open_text_file(text.path) as f:
        f.seek(text.start)
        offset = text.start  # file offset of carry[0]
        carry = b""  # bytes after the last newline sent
        while True:
            block = read_or_fail(f, min(block_bytes, text.stop - offset - len(carry)), text.path)
            data = carry + block
            if offset == 0 and data.startswith(BOM):
                data, offset = data[len(BOM):], len(BOM)
            if offset + len(data) >= text.stop or not block:
                if data:
                    yield Block(data, offset)
                return
            end = data.rfind(b"\n") + 1
            if end:
                yield Block(data[:end], offset)
                offset += end
            carry = data[end:]
            # slack: the character after a cut must be whole (to tell whether the cut goes through
            # a word), and a trailing \r may yet turn out to end the line (and be dropped)
            while len(carry) > long_line + 4:
                cut, split = first_cut(carry, long_line)
                yield Block(carry[:cut], offset, open_end=True, split_words=split)
                offset += cut
                carry = carry[cut:]


def first_cut(line: bytes, limit: int) -> tuple[int, int]:
    """Where to cut the head off a line longer than `limit` bytes: (cut, 1 if through a word).

    At the start of the last run of spaces within the first `limit` bytes that follows a
    non-space: sentencepiece starts a new word there, so the pieces' tokens are the whole
    line's (and word mode splits at spaces anyway). With no such space, at `limit`, moved back to a
    character boundary. The cut depends only on line[:limit + 4], so cutting a line's head before
    its end is read gives the same pieces as cutting the whole line.
    """
    cut = line.rfind(b" ", 1, limit + 1)
    if cut > 0:
        cut = len(line[:cut].rstrip(b" "))
        if cut > 0:
            return cut, 0
    cut = limit
    while line[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    before = line[max(0, cut - 4) : cut].decode("utf-8", "ignore")[-1:]
    after = line[cut : cut + 4].decode("utf-8", "ignore")[:1]
    return cut, int(bool(before) and bool(after) and not before.isspace() and not after.isspace())


def cut_line(line: str, limit: int | None = None) -> list[str]:
    """A whole line as pieces of at most `limit` (None: corpus.LONG_LINE_BYTES) UTF-8 bytes (see `first_cut`)."""
    limit = limit or corpus.LONG_LINE_BYTES
    if len(line) * 4 <= limit:  # cannot be longer than limit bytes: skip the encoding
        return [line]
    rest = line.encode("utf-8")
    pieces = []
    while len(rest) > limit:
        cut, _ = first_cut(rest, limit)
        pieces.append(rest[:cut].decode("utf-8", "replace"))
        rest = rest[cut:]
    pieces.append(rest.decode("utf-8", "replace"))
    return pieces


def cut_long_lines(lines: list[str], open_last: bool = False, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Lines as pieces for the tokenizer: (pieces, indices of the pieces that do not end their
    line). `open_last`: the last line goes on in the next block. `limit`: see `cut_line`."""
    limit = limit or corpus.LONG_LINE_BYTES
    if not lines or max(map(len, lines)) * 4 <= limit:  # the usual case: nothing to cut
        return lines, [len(lines) - 1] if open_last and lines else []
    pieces: list[str] = []
    continued: list[int] = []
    for i, line in enumerate(lines):
        parts = cut_line(line, limit)
        pieces.extend(parts)
        ends_here = not (open_last and i == len(lines) - 1)
        continued.extend(range(len(pieces) - len(parts), len(pieces) - ends_here))
    return pieces, continued


def block_pieces(block: Block, errors: str, name: str, long_line: int | None = None) -> tuple[list[str], list[int], TextStats]:
    """The lines of a block as pieces for the tokenizer, the pieces that do not end their line,
    and the block's share of the text's TextStats (as `text_stats` counts them)."""
    text, _ = decode(block.data, block.offset, errors, name)
    lines = text.split("\n")
    tail = lines.pop()  # "" after a final newline; else the text's last line, or a long line's head
    newlines = len(lines)
    if tail and not block.open_end:
        lines.append(tail)
    dropped_cr = 0
    if "\r" in text:  # only lines that end here lose a trailing \r, not the head of an open one
        dropped_cr = sum(line.endswith("\r") for line in lines)
        lines = [line.removesuffix("\r") for line in lines]
    line_ends = len(lines)
    if block.open_end:
        lines.append(tail)
    pieces, continued = cut_long_lines(lines, block.open_end, long_line)
    # without the newlines and dropped carriage returns, plus one newline per line end; bytes are
    # the file's own (with errors='replace', a replaced byte counts as itself, not as U+FFFD)
    stats = TextStats(
        bytes=len(block.data) - newlines - dropped_cr + line_ends,
        words=len(text.split()) - block.split_words,
        lines=line_ends,
        chars=len(text) - newlines - dropped_cr + line_ends,
    )
    return pieces, continued, stats


def text_pieces(text: Text) -> Iterator[tuple[list[str], list[int], TextStats, int]]:
    """The whole text as (pieces, continued, stats, bytes read) per block, in this process."""
    if text.lines is not None:
        for start in range(0, len(text.lines), 4096):
            lines = text.lines[start : start + 4096]
            pieces, continued = cut_long_lines(lines)
            yield pieces, continued, text_stats(lines), 0
        return
    for block in read_blocks(text):
        yield *block_pieces(block, text.errors, text.name), len(block.data)


def text_stats(lines: list[str]) -> TextStats:
    """(UTF-8 bytes, whitespace-separated words, lines, characters) of lines in memory; bytes and
    characters count one newline per line."""
    n_bytes = sum(len(line.encode("utf-8")) + 1 for line in lines)
    n_words = sum(len(line.split()) for line in lines)
    n_chars = sum(len(line) + 1 for line in lines)
    return TextStats(n_bytes, n_words, len(lines), n_chars)
