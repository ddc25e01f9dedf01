"""Token files (a header, then the ids, read with np.memmap) and the batch layout for training.

Token file, little-endian:

    offset  size  field
    0       8     magic b"LMTRTOK\\0"
    8       4     format version (2; version 1 files, without the character count, are still read)
    12      4     bytes per token (2: uint16, 4: uint32)
    16      8     vocabulary size
    24      8     token count
    32      8     UTF-8 bytes of the text (for bits per byte)
    40      8     whitespace-separated words of the text (for word-level perplexity)
    48      8     lines of the text
    56      8     characters of the text (for bits per character; 0 in version 1)
    64      ...   token ids
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtrain.atomic import atomic_open
from lmtrain.errors import LmtrainError

MAGIC = b"LMTRTOK\0"
VERSION = 2
HEADER = struct.Struct("<8sIIQQQQQQ")
assert HEADER.size == 64


@dataclass(frozen=True)
class TokenFile:
    """The ids of one encoded split and the size of the text they came from."""

    tokens: np.ndarray  # (tokens,) uint16 or uint32, usually a read-only memmap
    vocab_size: int
    text_bytes: int
    text_words: int
    text_lines: int
    text_chars: int = 0  # 0: not known (a version 1 file)


def write_tokens(path: Path, tokens: np.ndarray, vocab_size: int, text_bytes: int, text_words: int, text_lines: int,
                 text_chars: int = 0) -> None:
    """Write a token file atomically (temporary file, fsync, rename)."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError("token id out of vocabulary range")
    header = HEADER.pack(MAGIC, VERSION, np.dtype(dtype).itemsize, vocab_size, len(tokens), text_bytes, text_words, text_lines, text_chars)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        f.write(header)
        f.write(np.ascontiguousarray(tokens, dtype=dtype).tobytes())


def read_tokens(path: Path) -> TokenFile:
    """Open a token file, checking its header, with the ids as a read-only memmap."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise LmtrainError(f"cannot read token file {path}: {e.strerror}") from None
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise LmtrainError(f"{path} is not an lmtrain token file")
    magic, version, width, vocab_size, count, text_bytes, words, lines, chars = HEADER.unpack(raw)
    if version not in (1, VERSION) or width not in (2, 4):
        raise LmtrainError(f"{path}: unsupported token file version {version} or token width {width}")
    dtype = np.uint16 if width == 2 else np.uint32
    if os.path.getsize(path) != HEADER.size + count * width:
        raise LmtrainError(f"{path} is truncated or has trailing bytes (header says {count} tokens)")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,)) if count else np.zeros(0, dtype)
    return TokenFile(tokens, vocab_size, text_bytes, words, lines, chars if version >= 2 else 0)


def batchify(tokens: np.ndarray, batch_size: int, start_id: int, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay a split out as `batch_size` contiguous streams of (input, target) pairs.

    The stream is `start_id` (end-of-sentence, standing for "the start of the text") followed by
    the split's tokens, so every token of the split is predicted once. For tokens a b c d e f g
    and batch_size 2 (s = start_id):

        inputs      targets
        s  c        a  d       each column is one stream; row t of column b follows row t-1,
        a  d        b  e       so the recurrent state carries from one window to the next
        b  e        c  f

    Without `pad` the tokens that do not fill the last row (here g) are dropped, as for training.
    With `pad` the streams are ceil(N / batch_size) long and the gaps hold input 0 and target -1
    (ignored by the loss), as for evaluation, where every token counts.

    Returns (inputs, targets), each (steps, batch_size) int64.
    """
    n = len(tokens)
    steps = -(-n // batch_size) if pad else n // batch_size
    inputs = torch.zeros(steps * batch_size, dtype=torch.int64)
    targets = torch.full((steps * batch_size,), -1, dtype=torch.int64)
    used = min(n, steps * batch_size)
    ids = torch.from_numpy(np.asarray(tokens[:used], dtype=np.int64))
    targets[:used] = ids
    inputs[0] = start_id
    inputs[1:used] = ids[: used - 1]
    return inputs.view(batch_size, steps).t().contiguous(), targets.view(batch_size, steps).t().contiguous()


def windows(inputs: torch.Tensor, targets: torch.Tensor, bptt: int):
    """Yield consecutive (x, y) windows of at most `bptt` steps; each (T, B)."""
    for start in range(0, inputs.size(0), bptt):
        yield inputs[start : start + bptt], targets[start : start + bptt]
