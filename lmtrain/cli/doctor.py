"""`lmtrain doctor`: what this machine offers and what lmtrain does with it (lmtrain.tools.doctor)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lmtrain.cli.app import app, user_errors
from lmtrain.errors import LmtrainError
from lmtrain.tools import doctor as diagnosis


@app.command()
def doctor(
    device: Annotated[str, typer.Option(help="auto (the CPU, and CUDA where there is one), cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of the text report.")] = False,
) -> None:
    """Check this machine: versions, CPU features, CUDA, Triton, the C++ ops' build, and for each
    cell and precision the path lmtrain picks and whether it passes its self-check. Exit code 0:
    every check passed; 1: something fell back (the report says what). Paste it into bug reports."""
    with user_errors():
        if device not in ("auto", "cpu", "cuda"):
            raise LmtrainError(f"--device must be auto, cpu or cuda, got '{device}'")
        if device == "cuda" and "cuda" not in diagnosis.devices_available():
            raise LmtrainError("--device cuda: no CUDA device is available")
        report = diagnosis.diagnose(None if device == "auto" else [device])
    typer.echo(json.dumps(report, indent=1) if as_json else diagnosis.render(report))
    raise typer.Exit(diagnosis.exit_code(report))
