"""`lmtrain synth`, `report`, `reproduce` and `results` (lmtrain.tools)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmtrain.cli.app import app, say, user_errors
from lmtrain.errors import LmtrainError, require
from lmtrain.progress import TerminalProgress
from lmtrain.tools import (
    DEFAULT_ALPHABET,
    DEFAULT_K,
    memoryless_perplexity,
    optimum_perplexity,
    write_copy_corpus,
)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write train.txt, valid.txt and test.txt to.")],
    k: Annotated[int, typer.Option("--k", help="Random symbols per line, repeated after the separator.")] = DEFAULT_K,
    alphabet: Annotated[int, typer.Option(help="Distinct symbols (s0, s1, ...).")] = DEFAULT_ALPHABET,
    lines: Annotated[int, typer.Option(help="Training lines; valid and test get 5 % as many each.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same files.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Overwrite train.txt, valid.txt and test.txt already in OUT_DIR.")] = False,
) -> None:
    """Write the copy task: a synthetic corpus whose best possible perplexity is known (lmtrain/tools/synth.py)."""
    with user_errors():
        require(
            (k >= 1, f"--k must be at least 1, got {k}"),
            (alphabet >= 2, f"--alphabet must be at least 2, got {alphabet}"),
            (lines >= 1, f"--lines must be at least 1, got {lines}"),
        )
        held_out = max(1, lines // 20)
        try:
            write_copy_corpus(out_dir, k=k, alphabet_size=alphabet, n_train=lines, n_valid=held_out, n_test=held_out,
                              seed=seed, force=force)
        except OSError as e:
            raise LmtrainError(f"cannot write the corpus to {out_dir}: {e.strerror}") from None
        typer.echo(
            f"{out_dir}: {lines:,} train, {held_out:,} valid, {held_out:,} test lines | K {k}, alphabet {alphabet} | "
            f"optimum ppl {optimum_perplexity(k, alphabet):.4f} (no memory: {memoryless_perplexity(k, alphabet):.4f})"
        )


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Also draw RUN/curves.png (needs matplotlib: pip install 'lmtrain[plot]').")] = True,
) -> None:
    """Write RUN/report.md (and RUN/curves.png): perplexities, learning rate and speed by epoch, the config."""
    from lmtrain.tools import write_report

    with user_errors():
        if not run.is_dir():
            raise LmtrainError(f"run directory not found: {run}")
        table, plotted = write_report(run, plot)
        typer.echo(table)
        typer.echo(f"wrote {run / 'report.md'}" + (f" and {run / 'curves.png'}" if plotted else ""))
        if plot and not plotted:
            say("note: no curves.png: matplotlib is not installed (pip install 'lmtrain[plot]')")


@app.command()
def reproduce(
    name: Annotated[str, typer.Argument(help="A published setup: a config name in configs/ (ptb-small, ptb-small-best, ptb-medium, ...).")],
    data: Annotated[Path, typer.Option(help="Directory holding ptb/ and wikitext-2/ (make data fills data/).")] = Path("data"),
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key of the config (recorded in the result).")] = None,
    config_dir: Annotated[Path, typer.Option(help="Where the configs are.")] = Path("configs"),
    runs_dir: Annotated[Path, typer.Option(help="The run goes to RUNS_DIR/reproduce-NAME.")] = Path("runs"),
    results_dir: Annotated[Path, typer.Option(help="The result goes to RESULTS_DIR/NAME.json.")] = Path("results"),
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier reproduction's run directory.")] = False,
) -> None:
    """Train a published setup, score valid and test as one stream each, write results/NAME.json."""
    from lmtrain.tools import reproduce as run_reproduction

    with user_errors():
        try:
            r = run_reproduction(name, data, config_dir=config_dir, runs_dir=runs_dir, results_dir=results_dir,
                                 overrides=overrides or [], progress=TerminalProgress(), say=say, force=force)
        except KeyboardInterrupt:
            say(f"\ninterrupted; no result written to {results_dir / (name + '.json')}")
            raise typer.Exit(130) from None
        published = r["published"]
        unit = next(key for key in published if key.startswith("test_")).removeprefix("test_")  # ppl or bpc
        ours = (f"valid {r['valid_ppl']:.2f} test {r['test_ppl']:.2f}" if unit == "ppl" else
                f"valid {r['valid_' + unit]:.3f} test {r['test_' + unit]:.3f} {unit}")
        typer.echo(
            f"{name}: {ours} (published {published['valid_' + unit]} / {published['test_' + unit]}) | "
            f"{r['train_minutes']:.1f} min of training on {r['device']} | {results_dir / (name + '.json')}"
        )


@app.command()
def results(
    results_dir: Annotated[Path, typer.Option(help="Where `lmtrain reproduce` wrote its results.")] = Path("results"),
) -> None:
    """Print every reproduction result beside the published numbers, as one markdown table."""
    from lmtrain.tools import results_table

    with user_errors():
        typer.echo(results_table(results_dir))
