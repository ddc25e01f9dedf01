"""The command line: typer only. Each command parses, checks, calls one stage function, prints
and exits; lmtrain.cli.app holds the app and the error funnel, one module per command the rest."""

from lmtrain.cli import train, evaluate, score, generate, export, bench, tools, doctor  # noqa: E402,F401  (each adds its commands to app, in this order)
from lmtrain.cli.app import app, main

__all__ = ["app", "main"]
