"""`lmtrain export`: a trained run's model in a form other programs load."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

from lmtrain.atomic import atomic_open, current_umask
from lmtrain.cli.app import app, say, user_errors
from lmtrain.errors import LmtrainError
from lmtrain.model import build_saved, hub, onnx_bytes, read_saved, torch_lstm_payload
from lmtrain.runs import is_run_file

FORMATS = ("safetensors", "onnx", "torch-lstm")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory (its best.pt), a checkpoint file or an export directory.")],
    out: Annotated[Path, typer.Option("--out", help="What to write: a directory for safetensors, a file for the others.")],
    format: Annotated[str, typer.Option("--format", help="safetensors (weights, config.json and the tokenizer: lmtrain.load reads it), onnx (the one-token step as standard operators), torch-lstm (a state_dict for stock nn.Embedding, nn.LSTM and nn.Linear); docs/usage.md.")] = "safetensors",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Write RUN's model for other programs, whole or not at all."""
    with user_errors():
        if format not in FORMATS:
            raise LmtrainError(f"--format must be one of {', '.join(FORMATS)}; got '{format}'")
        if overwrites_run(out, run):
            raise LmtrainError(f"--out {out} is {run} or one of its files; export to another path")
        if (out.exists() or out.is_symlink()) and not force:
            raise LmtrainError(f"{out} exists; --force replaces it")
        if not out.parent.is_dir():
            raise LmtrainError(f"no directory {out.parent} to write {out.name} into")
        if format == "safetensors":
            hub.safetensors_torch()  # the package, before anything is read
            saved = read_saved(run)
            write_directory(out, lambda d: hub.write_files(saved, d))
            say(f"wrote {out}/ ({hub.WEIGHTS}, {hub.CONFIG}, {hub.TOKENIZER})")
            return
        saved = read_saved(run)
        if format == "onnx":
            data = onnx_bytes(build_saved(saved, torch.device("cpu")))
        else:
            payload = torch_lstm_payload(saved.config, saved.weights)
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getvalue()
        if out.is_dir():
            raise LmtrainError(f"{out} is a directory; --format {format} writes a file")
        with atomic_open(out) as f:
            f.write(data)
        say(f"wrote {out} ({format}, {len(data):,} bytes)")


def overwrites_run(out: Path, run: Path) -> bool:
    """Whether writing `out` would replace `run` itself (a checkpoint, an export directory) or a
    file of the run directory `run` (its checkpoints, logs, marker)."""
    target, source = out.resolve(), run.resolve()
    if target == source or hub.is_export(source) and source in target.parents:
        return True
    return source.is_dir() and target.parent == source and is_run_file(target.name)


def permissions(directory: Path) -> None:
    """The usual permissions (0666 / 0777 less the umask) for what mkdtemp and the writers made private."""
    mask = current_umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~mask)


def write_directory(out: Path, fill) -> None:
    """`fill(directory)` into a new directory beside `out`, then moved to `out` (an old `out`,
    with --force, removed only once the new one is whole)."""
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        fill(staging)
        permissions(staging)
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old"
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
