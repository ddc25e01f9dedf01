"""`lmtrain evaluate`: perplexities of a saved run on texts (lmtrain.evaluation.evaluate_run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmtrain.cli.app import app, check_encoding_errors, say, user_errors
from lmtrain.errors import LmtrainError, require
from lmtrain.evaluation import SPLITS, EvaluateSettings, evaluate_run, CacheSettings, DynamicSettings


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory (its best.pt) or a checkpoint file.")],
    files: Annotated[Optional[list[Path]], typer.Argument(help="Text files to score instead of a split of the training corpus.", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Split of the training corpus: train, valid or test.")] = "test",
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams (default: the run's train.eval_batch_size). 1 gives every token its full left context.")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic evaluation (Krause et al. 2018): a gradient step after each scored window. One stream.")] = False,
    dynamic_lr: Annotated[float, typer.Option(help="Dynamic evaluation's learning rate.")] = DynamicSettings.lr,
    dynamic_decay: Annotated[float, typer.Option(help="Dynamic evaluation's pull back to the trained weights.")] = DynamicSettings.decay,
    dynamic_bptt: Annotated[int, typer.Option(help="Tokens per window between dynamic updates.")] = DynamicSettings.bptt,
    stats_batches: Annotated[int, typer.Option(help="Training batches (100 streams x the window) for dynamic evaluation's gradient statistics; 0: the whole split.")] = 0,
    cache: Annotated[bool, typer.Option("--cache", help="The continuous cache pointer (Grave et al. 2017). One stream.")] = False,
    cache_window: Annotated[int, typer.Option(help="Previous positions the cache looks at.")] = CacheSettings.window,
    cache_theta: Annotated[float, typer.Option(help="The cache's inverse temperature.")] = CacheSettings.theta,
    cache_lambda: Annotated[float, typer.Option(help="The cache's weight in the mixture.")] = CacheSettings.lam,
    tune_cache: Annotated[bool, typer.Option("--tune-cache", help="Choose --cache-theta and --cache-lambda on the validation split (a small grid).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    encoding_errors: Annotated[str, typer.Option(help="Bytes of FILES (or of the run's corpus) that are not UTF-8: strict (stop with an error) or replace (with U+FFFD).")] = "strict",
) -> None:
    """Perplexity, word-level perplexity and bits per byte of a trained model.

    FILES may be pipes (`/dev/stdin`, `<(...)`, a FIFO): they are read once, into a temporary file.
    """
    with user_errors():
        check_encoding_errors(encoding_errors)
        if split not in SPLITS:
            raise LmtrainError(f"--split must be train, valid or test, got '{split}'")
        if batch_size is not None and batch_size < 1:
            raise LmtrainError(f"--batch-size must be at least 1, got {batch_size}")
        cache = cache or tune_cache
        require(
            (not ((dynamic or cache) and batch_size not in (None, 1)), f"--dynamic and --cache score one stream: --batch-size must be 1, got {batch_size}"),
            (dynamic_lr > 0 and dynamic_decay >= 0 and dynamic_bptt >= 1 and stats_batches >= 0,
             "--dynamic-lr must be positive, --dynamic-decay and --stats-batches not negative, --dynamic-bptt at least 1"),
            (cache_window >= 1 and cache_theta > 0 and 0 <= cache_lambda <= 1,
             "--cache-window must be at least 1, --cache-theta positive and --cache-lambda in [0, 1]"),
        )
        settings = EvaluateSettings(
            split=split,
            batch_size=batch_size,
            dynamic=DynamicSettings(dynamic_lr, dynamic_decay, bptt=dynamic_bptt, stats_batches=stats_batches) if dynamic else None,
            cache=CacheSettings(cache_window, cache_theta, cache_lambda) if cache else None,
            tune_cache=tune_cache,
            encoding_errors=encoding_errors,
        )
        done = evaluate_run(run, files, settings, say)
        if as_json:
            typer.echo(json.dumps(done.report))
            return
        for key, value in done.settings.items():
            typer.echo(f"{key}: " + ", ".join(f"{k} {v:g}" for k, v in value.items()))
        for name, m in done.results.items():
            typer.echo(format_metrics(name, m))
        if len(done.results) > 1:
            typer.echo(format_metrics("all", done.report))


def format_metrics(name: str, m: dict) -> str:
    return (
        f"{name}: {m['tokens']:,} tokens | ppl {m['ppl']:.2f} | word ppl {m['word_ppl']:.2f} "
        f"({m['words']:,} words) | {m['bits_per_byte']:.3f} bits/byte"
        + (f" | {m['bits_per_char']:.3f} bits/char" if m["bits_per_char"] is not None else "")
    )
