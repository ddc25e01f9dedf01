"""The command line: the typer app, the one place that exits. Each command lives in its own
module (lmtrain.cli.train, evaluate, generate, bench, tools), parses and checks its options, calls
one stage function and prints.

Precedence of settings: the dataclass defaults (lmtrain/config.py) < the TOML file given with
--config < each --set section.key=value, in order. Problems with the user's input print one line,
`error: ...`, on stderr and exit with code 2 (`user_errors`).
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

import typer

try:
    from click import get_current_context
except ImportError:  # typer from 0.2x on carries its own copy of click
    from typer._click.globals import get_current_context

from lmtrain.errors import LmtrainError, one_line
from lmtrain.model import selfcheck
from lmtrain.runtime import keep_freed_memory
from lmtrain.text import ENCODING_ERRORS
from lmtrain.training import distributed



app = typer.Typer(
    add_completion=True,  # --install-completion and --show-completion (docs/usage.md)
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train, evaluate and sample next-word LSTM language models.",
)


@contextmanager
def user_errors():
    """Turn LmtrainError into one line on stderr and exit code 2; refuse float options that are
    not finite first (`finite_options`)."""
    try:
        finite_options()
        selfcheck.check_switches()
        yield
    except LmtrainError as e:
        if not isinstance(e, distributed.ReportedByMainRank):  # under torchrun: the main rank says it once
            typer.echo(f"error: {one_line(e)}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # an environment problem no check foresaw (a full disk, permissions): still one line
        where = f" ({e.filename})" if e.filename else ""
        typer.echo(f"error: {one_line(f'{e.strerror or e}{where}')}", err=True)
        raise typer.Exit(2) from None


def finite_options() -> None:
    """Every float option of the command being run must be a finite number: `inf` and `nan` parse
    as floats, and no option means either (checked here, so no command can forget it)."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise LmtrainError(f"{param.opts[0]} must be a finite number, got {item}")


def say(message: str) -> None:
    typer.echo(message, err=True)


def quiet(message: str) -> None:
    pass


def check_encoding_errors(value: str) -> None:
    if value not in ENCODING_ERRORS:
        raise LmtrainError(f"--encoding-errors must be {' or '.join(ENCODING_ERRORS)}, got '{value}'")


@contextmanager
def quiet_broken_pipe():
    """A reader that stops early (`lmtrain generate ... | head`) ends the command quietly, with
    the exit code of a process ended by SIGPIPE, as other tools in a pipe do."""
    try:
        yield
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        except (OSError, ValueError):
            pass
        raise typer.Exit(141) from None


def main() -> None:
    """The console script: the app, and under torchrun each rank's exit through distributed.leave."""
    keep_freed_memory()
    if not distributed.launched():
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    distributed.leave(code)
