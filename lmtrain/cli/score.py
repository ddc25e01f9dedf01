"""`lmtrain score`: the log-probability of each line, token or file under a saved run
(lmtrain.evaluation.score_lines), streamed as the input is read."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmtrain.cli.app import app, check_encoding_errors, quiet_broken_pipe, say, user_errors
from lmtrain.errors import LmtrainError, require
from lmtrain.evaluation import BATCH_LINES, Scored, score_lines
from lmtrain.model import load_run
from lmtrain.runtime import resolve_device
from lmtrain.text import stream_lines

PER = ("line", "token", "file")
STDIN = "-"


@app.command()
def score(
    run: Annotated[Path, typer.Argument(help="Run directory (its best.pt) or a checkpoint file.")],
    files: Annotated[Optional[list[str]], typer.Argument(help="Text files to score, a line at a time; - (or none) reads standard input.", show_default=False)] = None,
    per: Annotated[str, typer.Option(help="What each output line scores: line, token or file.")] = "line",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per output line.")] = False,
    carry_state: Annotated[bool, typer.Option("--carry-state", help="Score each file's lines as one document, in order, the state carried from line to line (default: each line from a fresh state).")] = False,
    batch_size: Annotated[int, typer.Option(help="Lines read and scored at a time (side by side, without --carry-state); output comes a batch at a time.")] = BATCH_LINES,
    encoding_errors: Annotated[str, typer.Option(help="Bytes that are not UTF-8: strict (stop with an error) or replace (with U+FFFD).")] = "strict",
) -> None:
    """Log-probabilities (natural log) of text under a trained model, for rescoring and filtering.

    Per line: {"file", "line", "text", "tokens", "log_prob", "ppl"}; a line's tokens are its pieces
    and its end (<eos>), the first predicted from <eos>, as evaluation does. Per token: {"file",
    "line", "position", "id", "token", "log_prob"}. Per file: {"file", "lines", "tokens",
    "log_prob", "ppl"}. Without --json: tab-separated log_prob, tokens, ppl and the text.
    """
    with user_errors(), quiet_broken_pipe():
        check_encoding_errors(encoding_errors)
        files = files or [STDIN]
        require(
            (per in PER, f"--per must be line, token or file, got '{per}'"),
            (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
            (files.count(STDIN) <= 1, "standard input (-) can be read only once: give - at most once"),
        )
        for name in files:
            check_input(name)
        loaded = load_run(run, resolve_device("auto"), say)
        bptt = loaded.config.train.bptt
        for name in files:
            with ExitStack() as stack:
                lines = input_lines(name, encoding_errors, stack)
                interactive = name == STDIN and sys.stdin.isatty()
                scored = score_lines(loaded.model, loaded.tokenizer, lines, bptt=bptt,
                                     batch_lines=1 if interactive else batch_size, carry_state=carry_state)
                write_scores(scored, name, per, as_json, loaded.tokenizer)


def check_input(name: str) -> None:
    """Before anything is scored: each file exists and is not a directory (reading it may still fail)."""
    if name == STDIN:
        return
    path = Path(name)
    if not path.exists():
        raise LmtrainError(f"file to score not found: {path}")
    if path.is_dir():
        raise LmtrainError(f"{path} is a directory: give the text files in it")


def input_lines(name: str, encoding_errors: str, stack: ExitStack) -> Iterator[str]:
    if name == STDIN:
        return stream_lines(sys.stdin.buffer, "standard input", encoding_errors)
    try:
        f = stack.enter_context(open(name, "rb"))
    except OSError as e:
        raise LmtrainError(f"cannot read {name}: {e.strerror}") from None
    return stream_lines(f, name, encoding_errors)


def write_scores(scored: Iterator[Scored], name: str, per: str, as_json: bool, tokenizer) -> None:
    """Print each score as it comes (flushed), or the file's total at its end."""
    out = sys.stdout
    lines = tokens = 0
    total = 0.0
    for number, s in enumerate(scored, 1):
        lines, tokens, total = number, tokens + s.tokens, total + s.log_prob
        if per == "line":
            record = {"file": name, "line": number, "text": s.text, "tokens": s.tokens, "log_prob": s.log_prob, "ppl": s.ppl}
            out.write(json.dumps(record) + "\n" if as_json else f"{s.log_prob:.4f}\t{s.tokens}\t{s.ppl:.3f}\t{s.text}\n")
        elif per == "token":
            for position, (token_id, log_prob) in enumerate(zip(s.ids.tolist(), s.log_probs.tolist())):
                text = tokenizer.token_text(token_id)
                record = {"file": name, "line": number, "position": position, "id": token_id, "token": text, "log_prob": log_prob}
                out.write(json.dumps(record) + "\n" if as_json else f"{log_prob:.4f}\t{token_id}\t{text if text != chr(10) else '<eos>'}\n")
        out.flush()
    if per == "file":
        ppl = math.exp(-total / tokens) if tokens else None
        record = {"file": name, "lines": lines, "tokens": tokens, "log_prob": total, "ppl": ppl}
        out.write(json.dumps(record) + "\n" if as_json else f"{total:.4f}\t{tokens}\t{'-' if ppl is None else f'{ppl:.3f}'}\t{name}\n")
        out.flush()
