"""The command line: typer only. Each command parses, checks, calls one stage function, prints
and exits (`lmtrain.cli.app`)."""

from lmtrain.cli.app import app, main

__all__ = ["app", "main"]
