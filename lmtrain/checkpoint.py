"""Checkpoints: plain state_dicts and values, written atomically with a checksum, the previous one
kept, and loaded without unpickling code.

A checkpoint is a dict:
    format      "lmtrain-checkpoint", version 2 (version 1, without checksum and resume state,
                is still read for evaluate and generate)
    config      the resolved config as nested plain values (lmtrain.config.to_dict)
    corpus      where the corpus came from (an absolute path or "builtin")
    tokenizer   the sentencepiece model (kind, model bytes); vocab_size
    model       the model's state_dict: the weights to evaluate (NT-ASGD's average once averaging)
    optimizer   the optimizer's state_dict
    progress    epoch, step, lr, valid_nll, best_valid_nll, averaging; at: "epoch" or "stop"
    resume      last.pt only: everything else the loop needs to continue exactly (lmtrain.training.resume)

The file is torch.save's zip archive, whose end record carries a comment (zip's own field, which
every zip reader and torch.load skip):

    ... torch.save's archive ... | end of central directory, comment length 79 | lmtrain-sha256:<64 hex>

The digest is sha256 of the archive exactly as torch.save wrote it (comment length 0), so a
truncated file, a flipped bit anywhere, or a half-written copy fails the check with a message
naming the file, before torch reads any of it.

Writing X.pt writes the new checkpoint to a temporary file and fsyncs it, then hard-links the
current X.pt to X.prev.pt (the previous good checkpoint) and renames the new file over X.pt: at
every moment both names hold a whole checkpoint, whatever kills the process, and a write that
fails (a full disk) leaves both as they were.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmtrain.atomic import atomic_open
from lmtrain.errors import LmtrainError

FORMAT, VERSION = "lmtrain-checkpoint", 2
READABLE_VERSIONS = (1, 2)
MARKER = b"lmtrain-sha256:"
COMMENT_LENGTH = len(MARKER) + 64  # the marker and a hex sha256
END_RECORD = b"PK\x05\x06"  # zip's end of central directory: 22 bytes, the last 2 the comment length


class CheckpointDamaged(LmtrainError):
    """The file is truncated or corrupted: an older checkpoint may stand in for it."""


class CheckpointWriteError(LmtrainError):
    """A checkpoint could not be written (a full disk, permissions); the one before is intact."""


def previous_path(path: Path) -> Path:
    """RUN/last.pt -> RUN/last.prev.pt: where the checkpoint before the current one is kept."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """The whole file: torch.save's archive of the payload with the checksum as its zip comment."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    archive = buffer.getvalue()
    if archive[-22:-18] != END_RECORD or archive[-2:] != b"\0\0":  # torch.save never writes a comment
        raise RuntimeError("torch.save wrote an archive without a plain end record")
    digest = hashlib.sha256(archive).hexdigest().encode("ascii")
    return archive[:-2] + COMMENT_LENGTH.to_bytes(2, "little") + MARKER + digest


def save_checkpoint(path: Path, payload: dict[str, Any], keep_previous: bool = True) -> None:
    """Write `payload` to `path` atomically with its checksum; the file there before becomes
    X.prev.pt when `keep_previous`. Raises CheckpointWriteError (path still intact) when the disk
    is full or not writable."""
    data = checkpoint_bytes(payload)  # serialize before touching any file

    def keep_current() -> None:  # only once the new checkpoint is whole on disk
        if keep_previous and path.is_file():
            keep_as(path, previous_path(path))

    try:
        with atomic_open(path, before_replace=keep_current) as f:
            f.write(data)
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {e.strerror or e}; the checkpoint there before is intact"
        ) from None


def keep_as(path: Path, kept: Path) -> None:
    """Make `kept` the same file as `path` (a hard link; a copy where links are not allowed),
    replacing `kept` atomically."""
    tmp = kept.with_name(f".{kept.name}.{secrets.token_hex(4)}.part")  # the pattern atomic_open uses
    try:
        try:
            os.link(path, tmp)
        except OSError:
            with open(path, "rb") as src, atomic_open(tmp) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, kept)
    finally:
        tmp.unlink(missing_ok=True)


def verify(path: Path) -> bool:
    """Check the checksum; False when the file has none (version 1, or cut before its end).
    Raises CheckpointDamaged when the digest does not match."""
    size = path.stat().st_size
    body = size - COMMENT_LENGTH - 2
    if body < 22:
        return False
    with open(path, "rb") as f:
        f.seek(body)
        tail = f.read()
        if tail[:2] != COMMENT_LENGTH.to_bytes(2, "little") or not tail[2:].startswith(MARKER):
            return False
        h = hashlib.sha256()
        f.seek(0)
        left = body
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        h.update(b"\0\0")
    if h.hexdigest().encode("ascii") != tail[2 + len(MARKER):]:
        raise CheckpointDamaged(f"{path} is damaged: its sha256 does not match the one it was written with")
    return True


MAX_ENTRIES = 100_000  # records in one archive; a model's state holds a few hundred


def check_archive(path: Path) -> None:
    """Refuse an archive that would expand when read: torch.save stores every record as it is,
    but torch.load also inflates compressed ones, so a small crafted file could ask for gigabytes.
    Every record must be stored uncompressed and all of them together fit in the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load names what is wrong with it
    size = path.stat().st_size
    packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise LmtrainError(f"{path} is not an lmtrain checkpoint: its record {packed[0][:80]!r} is compressed "
                           "(torch.save stores records as they are)")
    if len(records) > MAX_ENTRIES or sum(r.file_size for r in records) > size:
        raise LmtrainError(f"{path} is not an lmtrain checkpoint: its records claim more bytes than the file holds")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Verify the checksum, then load on the CPU with `weights_only=True`, so that a crafted file
    cannot run code: only tensors and plain values come back. What they are is not checked here:
    readers pass the payload through lmtrain.model.payload.check_payload before using it."""
    try:
        checked = verify(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise LmtrainError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise LmtrainError(f"{path} is a directory, not a checkpoint") from None
    except OSError as e:
        raise LmtrainError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if not checked and not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        if head == b"PK\x03\x04":
            raise CheckpointDamaged(f"{path} is damaged or truncated: the zip archive has no end")
        raise LmtrainError(f"{path} is not an lmtrain checkpoint (not a torch zip archive)")
    check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something: nothing in the file ran
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it asks for {named.group(1)})" if named else ""
        raise LmtrainError(f"{path} holds Python objects that a safe load refuses to build, not only tensors "
                           f"and plain values{what}: not loading it") from None
    except Exception as e:
        first_line = str(e).strip().split("\n")[0][:160]
        error = CheckpointDamaged if checked is False and head == b"PK\x03\x04" else LmtrainError
        raise error(f"{path} is not a readable lmtrain checkpoint ({first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LmtrainError(f"{path} is not an lmtrain checkpoint")
    if payload.get("version") not in READABLE_VERSIONS:
        raise LmtrainError(f"{path}: unsupported checkpoint version {payload.get('version')}")
    if payload["version"] >= 2 and not checked:
        raise CheckpointDamaged(f"{path} is damaged: a version {payload['version']} checkpoint without its checksum")
    return payload


def load_first_good(paths: list[Path], warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The first of `paths` that exists and loads; a damaged one is reported through `warn` and
    the next tried. Raises the first damage (or 'not found') when none loads."""
    first_error: LmtrainError | None = None
    existing = [p for p in paths if p.is_file()]
    for k, path in enumerate(existing):
        try:
            return path, load_checkpoint(path)
        except CheckpointDamaged as e:
            first_error = first_error or e
            if k + 1 < len(existing):
                warn(f"warning: {e}; using {existing[k + 1]} instead")
    raise first_error or LmtrainError(f"checkpoint not found: {paths[0]}")
