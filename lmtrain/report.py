"""Run reports: RUN/report.md and RUN/curves.png from what training wrote.

    RUN/metrics.jsonl + RUN/timing.jsonl + RUN/config.toml
        -> epoch table (terminal and report.md), config table, final figures
        -> curves.png: perplexity against epoch and against wall time, learning rate and tokens/s
           against step (matplotlib, the optional extra `lmtrain[plot]`; without it no PNG)
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from lmtrain.atomic import atomic_open
from lmtrain.errors import LmtrainError

# records with a validation: each epoch's end, and a train.max_steps stop mid-epoch (lmtrain.train)
VALIDATED = ("epoch", "stop")


def read_records(run: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, each with its timing.jsonl figures merged in when present."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise LmtrainError(f"{run} has no metrics.jsonl: not an lmtrain run directory, or training has not logged yet")
    records = read_jsonl(path)
    timing = {(t["kind"], t["epoch"], t["step"]): t for t in read_jsonl(run / "timing.jsonl")} if (run / "timing.jsonl").is_file() else {}
    return [{**timing.get((r["kind"], r["epoch"], r["step"]), {}), **r} for r in records]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One dict per line; a last line cut short (a run killed mid-write) is left out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise LmtrainError(f"{path}, line {number}: not JSON") from None
    return records


def epoch_table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown rows, one per epoch: lr, train and valid perplexity, tokens/s, elapsed minutes."""
    rows = ["| epoch | step | lr | train ppl | valid ppl | tokens/s | minutes |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r["kind"] not in VALIDATED:
            continue
        speed = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else ""
        minutes = f"{r['elapsed_s'] / 60:.1f}" if "elapsed_s" in r else ""
        epoch = f"{r['epoch']} (stop)" if r["kind"] == "stop" else r["epoch"]
        train_ppl = "—" if r["train_ppl"] is None else f"{r['train_ppl']:.2f}"  # None: every step skipped
        rows.append(f"| {epoch} | {r['step']:,} | {r['lr']:.4g} | {train_ppl} | {r['valid_ppl']:.2f} | {speed} | {minutes} |")
    return rows


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    epochs = [r for r in records if r["kind"] in VALIDATED]
    if not epochs:
        raise LmtrainError("the run has no finished epoch yet: nothing to report")
    best = min(epochs, key=lambda r: r["valid_loss"])
    last = epochs[-1]
    return {
        "epochs": last["epoch"], "steps": last["step"], "best valid ppl": round(best["valid_ppl"], 2),
        "best epoch": best["epoch"], "last train ppl": None if last["train_ppl"] is None else round(last["train_ppl"], 2),
        "last valid ppl": round(last["valid_ppl"], 2),
        "training minutes": round(last["elapsed_s"] / 60, 1) if "elapsed_s" in last else None,
    }


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Write the four curves to `path` (PNG); False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator, ScalarFormatter
    except ImportError:
        return False
    epochs = [r for r in records if r["kind"] in VALIDATED]
    steps = [r for r in records if r["kind"] == "train"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    (by_epoch, by_time), (lr_ax, speed_ax) = axes
    e = [r["epoch"] for r in epochs]
    by_epoch.plot(e, [r["train_ppl"] for r in epochs], "o-", label="train")
    by_epoch.plot(e, [r["valid_ppl"] for r in epochs], "s-", label="valid")
    by_epoch.set(title="perplexity by epoch", xlabel="epoch", ylabel="perplexity", yscale="log")
    if all("elapsed_s" in r for r in epochs):
        minutes = [r["elapsed_s"] / 60 for r in epochs]
        by_time.plot(minutes, [r["train_ppl"] for r in epochs], "o-", label="train")
        by_time.plot(minutes, [r["valid_ppl"] for r in epochs], "s-", label="valid")
    by_time.set(title="perplexity by wall time", xlabel="minutes", ylabel="perplexity", yscale="log")
    lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], "-")
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr")
    speed_ax.plot([r["step"] for r in steps if "tokens_per_s" in r], [r["tokens_per_s"] for r in steps if "tokens_per_s" in r], "-")
    speed_ax.set(title="training speed", xlabel="step", ylabel="tokens/s")
    speed_ax.set_ylim(bottom=0)
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (by_epoch, by_time):  # plain numbers on the log axes, not powers of ten
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True


def write_report(run: Path, with_plot: bool = True) -> tuple[str, bool]:
    """Write RUN/report.md (and RUN/curves.png when possible); return the epoch table and whether
    the PNG was written."""
    records = read_records(run)
    facts = summary(records)
    try:
        config = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        config = {}
    plotted = with_plot and plot(records, run / "curves.png")
    lines = [f"# Run report: {run.name}", "", "## Result", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {'—' if value is None else value} |" for key, value in facts.items()]
    lines += ["", "## Epochs", "", *epoch_table(records), ""]
    if plotted:
        lines += ["## Curves", "", "![train and valid perplexity, learning rate, tokens/s](curves.png)", ""]
    lines += ["## Config", "", "| key | value |", "|---|---|"]
    lines += [f"| {section}.{key} | {value} |" for section, table in config.items() for key, value in table.items()]
    with atomic_open(run / "report.md") as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return "\n".join(epoch_table(records)), plotted
