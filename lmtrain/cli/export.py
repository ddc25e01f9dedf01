"""`lmtrain export`: a trained run's weights in a form other programs load (lmtrain.model.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from lmtrain.atomic import atomic_open
from lmtrain.cli.app import app, say, user_errors
from lmtrain.errors import LmtrainError
from lmtrain.model import read_saved, torch_lstm_payload

FORMATS = ("torch-lstm",)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run directory (its best.pt) or a checkpoint file.")],
    out: Annotated[Path, typer.Option("--out", help="The file to write.")],
    format: Annotated[str, typer.Option("--format", help="torch-lstm: a state_dict that stock nn.Embedding, nn.LSTM and nn.Linear load (docs/usage.md).")] = "torch-lstm",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Write RUN's weights for other programs (written whole or not at all)."""
    with user_errors():
        if format not in FORMATS:
            raise LmtrainError(f"--format must be one of {', '.join(FORMATS)}; got '{format}'")
        if out.exists() and not force:
            raise LmtrainError(f"{out} exists; --force replaces it")
        if not out.parent.is_dir():
            raise LmtrainError(f"no directory {out.parent} to write {out.name} into")
        saved = read_saved(run)
        payload = torch_lstm_payload(saved.config, saved.weights)
        with atomic_open(out) as f:
            torch.save(payload, f)
        say(f"wrote {out} ({format}: {payload['shapes']['num_layers']} x {payload['shapes']['hidden_size']} LSTM, "
            f"vocabulary {payload['shapes']['vocab_size']})")
