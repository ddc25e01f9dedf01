"""Run reports: RUN/report.md and RUN/curves.png from what training wrote.

    RUN/metrics.jsonl + RUN/timing.jsonl + RUN/config.toml
        -> epoch table (terminal and report.md), config table, final figures
        -> curves.png: perplexity against epoch and against wall time, learning rate and tokens/s
           against step (matplotlib, the optional extra `lmtrain[plot]`; without it no PNG)
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from lmtrain.atomic import atomic_open
from lmtrain.errors import LmtrainError

# records with a validation: each epoch's end, and a train.max_steps stop mid-epoch (lmtrain.training.loop)
VALIDATED = ("epoch", "stop")


def read_records(run: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, each with its timing.jsonl figures merged in when present."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise LmtrainError(f"{run} has no metrics.jsonl: not an lmtrain run directory, or training has not logged yet")
    records = read_jsonl(path)
    timing = {record_key(t): t for t in read_jsonl(run / "timing.jsonl")} if (run / "timing.jsonl").is_file() else {}
    return [{**timing.get(record_key(r), {}), **r} for r in records]


def record_key(record: dict[str, Any]) -> tuple:
    """What a metrics record and its timing record share; a field may be missing or odd (JSON of
    any type), so the key is made of hashable reprs."""
    return tuple(repr(record.get(k)) for k in ("kind", "epoch", "step"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One dict per line; a last line cut short (a run killed mid-write) is left out."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LmtrainError(f"{path} is not UTF-8 text: not a log lmtrain wrote") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise LmtrainError(f"{path}, line {number}: not JSON") from None
        except RecursionError:
            raise LmtrainError(f"{path}, line {number}: nested too deeply to be a record lmtrain wrote") from None
        if not isinstance(record, dict):
            raise LmtrainError(f"{path}, line {number}: not a JSON object")
        records.append(record)
    return records


def number(record: dict[str, Any], key: str) -> float | None:
    """record[key] when it is a finite number; None when it is missing, null (a validation that
    was not run, a stretch of skipped steps) or anything else a hand-edited log may hold."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def shown(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def validated(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") in VALIDATED]


def epoch_table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown rows, one per epoch: lr, train and valid perplexity, tokens/s, elapsed minutes."""
    rows = ["| epoch | step | lr | train ppl | valid ppl | tokens/s | minutes |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in validated(records):
        speed = shown(number(r, "tokens_per_s"), ",.0f", "")
        elapsed = number(r, "elapsed_s")
        minutes = shown(None if elapsed is None else elapsed / 60, ".1f", "")
        epoch = r.get("epoch", "—")
        epoch = f"{epoch} (stop)" if r["kind"] == "stop" else epoch
        train_ppl = shown(number(r, "train_ppl"), ".2f")  # None: every step skipped
        rows.append(f"| {epoch} | {shown(number(r, 'step'), ',')} | {shown(number(r, 'lr'), '.4g')} | {train_ppl} | "
                    f"{shown(number(r, 'valid_ppl'), '.2f')} | {speed} | {minutes} |")
    return rows


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    epochs = validated(records)
    if not epochs:
        raise LmtrainError("the run has no finished epoch yet: nothing to report")
    scored = [r for r in epochs if number(r, "valid_loss") is not None]
    best = min(scored, key=lambda r: number(r, "valid_loss")) if scored else {}
    last = epochs[-1]
    elapsed = number(last, "elapsed_s")
    return {
        "epochs": last.get("epoch"), "steps": last.get("step"), "best valid ppl": rounded(number(best, "valid_ppl"), 2),
        "best epoch": best.get("epoch"), "last train ppl": rounded(number(last, "train_ppl"), 2),
        "last valid ppl": rounded(number(last, "valid_ppl"), 2),
        "training minutes": None if elapsed is None else round(elapsed / 60, 1),
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
    nan = math.nan
    epochs = validated(records)
    steps = [r for r in records if r.get("kind") == "train"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    (by_epoch, by_time), (lr_ax, speed_ax) = axes

    def column(rows: list[dict[str, Any]], key: str) -> list[float]:
        return [nan if number(r, key) is None else number(r, key) for r in rows]

    e = column(epochs, "epoch")
    by_epoch.plot(e, column(epochs, "train_ppl"), "o-", label="train")
    by_epoch.plot(e, column(epochs, "valid_ppl"), "s-", label="valid")
    by_epoch.set(title="perplexity by epoch", xlabel="epoch", ylabel="perplexity", yscale="log")
    if all(number(r, "elapsed_s") is not None for r in epochs):
        minutes = [r["elapsed_s"] / 60 for r in epochs]
        by_time.plot(minutes, column(epochs, "train_ppl"), "o-", label="train")
        by_time.plot(minutes, column(epochs, "valid_ppl"), "s-", label="valid")
    by_time.set(title="perplexity by wall time", xlabel="minutes", ylabel="perplexity", yscale="log")
    lr_ax.plot(column(steps, "step"), column(steps, "lr"), "-")
    lr_ax.set(title="learning rate", xlabel="step", ylabel="lr")
    timed = [r for r in steps if number(r, "tokens_per_s") is not None]
    speed_ax.plot(column(timed, "step"), column(timed, "tokens_per_s"), "-")
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
    except (OSError, UnicodeDecodeError, RecursionError, tomllib.TOMLDecodeError):
        config = {}  # the report is about the records; a config it cannot read is left out
    plotted = with_plot and plot(records, run / "curves.png")
    lines = [f"# Run report: {run.name}", "", "## Result", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {'—' if value is None else value} |" for key, value in facts.items()]
    lines += ["", "## Epochs", "", *epoch_table(records), ""]
    if plotted:
        lines += ["## Curves", "", "![train and valid perplexity, learning rate, tokens/s](curves.png)", ""]
    lines += ["## Config", "", "| key | value |", "|---|---|"]
    lines += [f"| {section}.{key} | {value} |" for section, table in config.items() if isinstance(table, dict)
              for key, value in table.items()]
    with atomic_open(run / "report.md") as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return "\n".join(epoch_table(records)), plotted
