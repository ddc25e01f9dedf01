"""Token files (a header, then the ids, read with np.memmap) and the batch layout for training.

Token file, little-endian:

    offset  size  field
    0       8     magic b"LMTRTOK\\0"
    8       4     format version (3; versions 1 and 2, without the two digests, are still read)
    12      4     bytes per token (2: uint16, 4: uint32)
    16      8     vocabulary size
    24      8     token count
    32      8     UTF-8 bytes of the text (for bits per byte)
    40      8     whitespace-separated words of the text (for word-level perplexity)
    48      8     lines of the text
    56      8     characters of the text (for bits per character; 0 in version 1)
    64      32    sha256 of the text the ids encode (its lmtrain.text.corpus digest; version 3)
    96      32    sha256 of the tokenizer's model bytes (version 3)
    128     32    sha256 of the ids' bytes (version 3)
    160     ...   token ids (from offset 64 in versions 1 and 2)

The first two digests say what the file was made from, so that a cache entry can be checked
against the text and tokenizer it is meant for, and the third what it holds, so that a file cut
short under a header rewritten to match is caught too (lmtrain.text.encode); the first two are all
zeros where that is not known.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtrain.atomic import atomic_open
from lmtrain.errors import LmtrainError

MAGIC = b"LMTRTOK\0"
VERSION = 3
HEADER = struct.Struct("<8sIIQQQQQQ")  # versions 1 and 2: the whole header
IDENTITY = struct.Struct("<32s32s32s")  # version 3: the text's, the tokenizer's and the ids' sha256 follow
assert HEADER.size == 64 and IDENTITY.size == 96
SCAN_CHUNK = 1 << 22  # ids per slice when reading a whole file's ids


@dataclass(frozen=True)
class TokenFile:
    """The ids of one encoded split and the size of the text they came from."""

    tokens: np.ndarray  # (tokens,) uint16 or uint32, usually a read-only memmap
    vocab_size: int
    text_bytes: int
    text_words: int
    text_lines: int
    text_chars: int = 0  # 0: not known (a version 1 file)
    text_digest: str = ""  # hex sha256 of the text; "": not known (before version 3)
    tokenizer_digest: str = ""  # hex sha256 of the tokenizer's model bytes; "": not known
    ids_digest: str = ""  # hex sha256 of the ids' bytes, as the header records it; "": not known
    version: int = VERSION

    def scan_ids(self) -> tuple[int, str]:
        """(largest id or -1 when empty, hex sha256 of the ids' bytes), in one pass over the ids."""
        h, largest = hashlib.sha256(), -1
        for start in range(0, len(self.tokens), SCAN_CHUNK):
            chunk = np.ascontiguousarray(self.tokens[start : start + SCAN_CHUNK])
            h.update(chunk)
            largest = max(largest, int(chunk.max()))
        return largest, h.hexdigest()


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class TokenWriter:
    """Writes a token file into an open binary file as the ids arrive: a blank header first, the
    ids, and the header with the counts last (`finish`), once they are known.

    Use it inside `atomic_open`, so that a reader never sees a file without its header.
    """

    def __init__(self, f, vocab_size: int, text_digest: str = "", tokenizer_digest: str = ""):
        self.f = f
        self.vocab_size = vocab_size
        self.inputs = digest_bytes(text_digest) + digest_bytes(tokenizer_digest)
        self.ids = hashlib.sha256()
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        f.write(bytes(HEADER.size + IDENTITY.size))

    def write(self, ids: np.ndarray) -> None:
        """Append ids (any integer dtype), shape (n,)."""
        if len(ids) and int(ids.max()) >= self.vocab_size:
            raise ValueError("token id out of vocabulary range")
        data = np.ascontiguousarray(ids, dtype=self.dtype).tobytes()
        self.ids.update(data)
        self.f.write(data)
        self.count += len(ids)

    def finish(self, text_bytes: int, text_words: int, text_lines: int, text_chars: int = 0) -> None:
        header = HEADER.pack(MAGIC, VERSION, np.dtype(self.dtype).itemsize, self.vocab_size, self.count,
                             text_bytes, text_words, text_lines, text_chars)
        self.f.seek(0)
        self.f.write(header + self.inputs + self.ids.digest())
        self.f.seek(0, os.SEEK_END)


def digest_bytes(hex_digest: str) -> bytes:
    """A hex sha256 as its 32 bytes; zeros for "" (not known)."""
    return bytes.fromhex(hex_digest) if hex_digest else bytes(32)


def write_tokens(path: Path, tokens: np.ndarray, vocab_size: int, *, text_bytes: int, text_words: int, text_lines: int,
                 text_chars: int = 0, text_digest: str = "", tokenizer_digest: str = "") -> None:
    """Write a token file atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        writer = TokenWriter(f, vocab_size, text_digest, tokenizer_digest)
        writer.write(tokens)
        writer.finish(text_bytes, text_words, text_lines, text_chars)


def read_tokens(path) -> TokenFile:
    """Open a token file, checking its header against its size, with the ids as a read-only
    memmap. `path` may also be an open binary file (an unnamed temporary one: see lmtrain.text.encode).
    What the ids are (their range, the text and tokenizer they came from) is for the caller to
    check: see lmtrain.text.encode.entry_problem."""
    try:
        if isinstance(path, (str, os.PathLike)):
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(HEADER.size + IDENTITY.size)
        else:
            size = os.fstat(path.fileno()).st_size
            path.seek(0)
            raw = path.read(HEADER.size + IDENTITY.size)
    except OSError as e:
        raise LmtrainError(f"cannot read token file {path}: {e.strerror}") from None
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise LmtrainError(f"{path} is not an lmtrain token file")
    magic, version, width, vocab_size, count, text_bytes, words, lines, chars = HEADER.unpack_from(raw)
    if version not in (1, 2, VERSION) or width not in (2, 4):
        raise LmtrainError(f"{path}: unsupported token file version {version} or token width {width}")
    if vocab_size < 2 or width != np.dtype(token_dtype(vocab_size)).itemsize:
        raise LmtrainError(f"{path}: a vocabulary of {vocab_size} does not take {width}-byte ids")
    offset = HEADER.size + (IDENTITY.size if version >= 3 else 0)
    if len(raw) < offset:
        raise LmtrainError(f"{path} is truncated (its header is cut short)")
    digests = ["", "", ""]  # the text's, the tokenizer's, the ids'
    if version >= 3:
        digests = [d.hex() if any(d) else "" for d in IDENTITY.unpack_from(raw, HEADER.size)]
    dtype = np.uint16 if width == 2 else np.uint32
    if size != offset + count * width:
        raise LmtrainError(f"{path} is truncated or has trailing bytes (header says {count} tokens)")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count else np.zeros(0, dtype)
    return TokenFile(tokens, vocab_size, text_bytes, words, lines, chars if version >= 2 else 0, *digests, version)


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


class Streams:
    """One side of `batchify`'s layout, inputs or targets, cut from the token array on demand.

    It has the layout's length and shape, and `streams[a:b]` is rows a..b-1 of it as a
    (b - a, batch_size) int64 tensor on `device`, built from the few tokens those rows hold;
    so a split of any size trains and evaluates straight from its token file's memmap. Row t of
    column c is position p = c * steps + t of the stream: the token at p - shift of the split
    (shift 1 for inputs, where position 0 holds `start_id`), or `fill` past the split's end.
    `streams[:, a:b]` keeps columns a..b-1 only (a rank's share of the streams, as
    lmtrain.training.distributed cuts a tensor layout), still unbuilt.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, steps: int, *, used: int, shift: int, start_id: int,
                 fill: int, device: torch.device | str = "cpu", columns: np.ndarray | None = None):
        self.tokens = tokens
        self.steps, self.used = steps, used
        self.shift, self.start_id, self.fill = shift, start_id, fill
        self.device = torch.device(device)
        # (B,) the stream position where each column starts
        self.columns = steps * np.arange(batch_size, dtype=np.int64) if columns is None else columns
        self.batch_size = len(self.columns)

    def __len__(self) -> int:
        return self.steps

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.steps, self.batch_size))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def to(self, device: torch.device | str) -> Streams:
        return self.changed(device=device)

    def changed(self, device: torch.device | str | None = None, columns: np.ndarray | None = None) -> Streams:
        """The same streams on `device` or with only `columns`."""
        return Streams(self.tokens, self.batch_size, self.steps, used=self.used, shift=self.shift,
                       start_id=self.start_id, fill=self.fill, device=self.device if device is None else device,
                       columns=self.columns if columns is None else columns)

    def contiguous(self) -> Streams:
        """Itself: the windows it builds are contiguous tensors already (for code written for tensors)."""
        return self

    def __getitem__(self, rows: slice | tuple[slice, slice]) -> torch.Tensor | Streams:
        if isinstance(rows, tuple) and len(rows) == 2 and rows[0] == slice(None) and isinstance(rows[1], slice):
            return self.changed(columns=self.columns[rows[1]])
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("Streams take contiguous row slices [a:b], or a column slice [:, a:b], only")
        first, stop, _ = rows.indices(self.steps)
        positions = np.arange(first, max(first, stop), dtype=np.int64)[:, None] + self.columns  # (T, B)
        source = positions - self.shift
        inside = (positions < self.used) & (source >= 0)
        out = np.full(positions.shape, self.fill, dtype=np.int64)
        out[inside] = self.tokens[source[inside]]
        if self.shift:
            out[positions == 0] = self.start_id
        window = torch.from_numpy(out)
        if self.device.type == "cuda":  # from pinned memory the copy needs no synchronisation: it runs
            # beside the GPU's work (torch's pinned-memory cache keeps the block until the copy is done)
            return window.pin_memory().to(self.device, non_blocking=True)
        return window.to(self.device)


def lazy_batchify(tokens: np.ndarray, batch_size: int, start_id: int, pad: bool = False) -> tuple[Streams, Streams]:
    """`batchify`'s (inputs, targets) layout without building it: two `Streams` of (steps,
    batch_size) whose row slices are built from `tokens` (a memmap, say) when asked for."""
    n = len(tokens)
    steps = -(-n // batch_size) if pad else n // batch_size
    used = min(n, steps * batch_size)
    tokens = np.asarray(tokens)
    return (Streams(tokens, batch_size, steps, used=used, shift=1, start_id=start_id, fill=0),
            Streams(tokens, batch_size, steps, used=used, shift=0, start_id=start_id, fill=-1))


def windows(inputs: torch.Tensor | Streams, targets: torch.Tensor | Streams, bptt: int):
    """Yield consecutive (x, y) windows of at most `bptt` steps; each (T, B)."""
    for start in range(0, inputs.size(0), bptt):
        yield inputs[start : start + bptt], targets[start : start + bptt]
