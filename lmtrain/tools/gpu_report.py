"""The results of `make gpu-check`'s steps (lmtrain.tools.gpu_check) and their report: report.json
for programs, report.md to read. Standard library only, as gpu_check."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timeout | missing | skipped | present (install: a CUDA torch was there)
    seconds: float
    limit_s: float
    exit_code: int | None = None
    note: str = ""
    figures: dict = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)


PASSING = ("ok", "present", "missing")  # "missing": doctor is not in this lmtrain yet, which is known


def summary(result: StepResult) -> str:
    """A step's figures in a few words, for the report's table."""
    f = result.figures
    if result.name == "cuda_tests":
        return ", ".join(f"{n} {kind}" for kind, n in f.items())
    if result.name == "bench" and f.get("records"):
        return f"{len(f['records'])} measurements (below)"
    if result.name == "train" and "valid_ppl" in f:
        return f"{f['steps']:,} steps, valid ppl {cell(f['valid_ppl'])}, {cell(f['tokens_per_s'])} tokens/s"
    return "below" if result.name == "doctor" and "report" in f else ""


# lmtrain.tools.bench.Record's fields, as `bench --json` prints them
BENCH_COLUMNS = ("what", "cell", "impl", "layers", "hidden_size", "batch_size", "bptt", "dtype", "tokens_per_s",
                 "peak_mem_mb", "reference", "ratio_vs_reference", "ratio_vs_our_lstm")


def markdown(report: dict, results: list[StepResult]) -> str:
    passed = sum(r.status in PASSING for r in results)
    lines = [f"# GPU check, {report['started']}", "",
             f"- GPU: {report['device'] or 'not seen by torch'} (nvidia-smi: {'; '.join(report['gpus'])})",
             f"- torch {report['torch'] or '(none usable)'}, CUDA {report['cuda'] or '-'} (the Makefile pins "
             f"{report['pinned_torch']}); Python {report['python'] or '-'}",
             f"- {passed} of {len(results)} steps passed in {report['total_s']:.1f} s (their limits add up to "
             f"{sum(report['limits_s'].values())} s); each step's output is in logs/STEP.out and logs/STEP.err", "",
             "| step | status | seconds | limit (s) | figures | note |", "|---|---|---:|---:|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.limit_s:.0f} | {summary(r)} | {r.note.replace('|', '/')} |")
    for r in results:
        if r.name == "bench" and r.figures.get("records"):
            lines += ["", "## bench --preset issue7", "", "| " + " | ".join(BENCH_COLUMNS) + " |",
                      "|" + "---|" * len(BENCH_COLUMNS)]
            lines += ["| " + " | ".join(cell(record.get(c)) for c in BENCH_COLUMNS) + " |" for record in r.figures["records"]]
        if r.name == "train" and r.figures:
            lines += ["", f"## ptb-medium, {r.figures.get('steps', 0):,} steps", ""]
            lines += [f"- {key}: {cell(value)}" for key, value in r.figures.items()]
        if r.name == "doctor" and "report" in r.figures:
            lines += ["", "## doctor --json", "", "```json", json.dumps(r.figures["report"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def write_report(out_dir: Path, facts: dict, results: list[StepResult]) -> tuple[Path, Path]:
    """out_dir/report.json (the facts and every step's result) and out_dir/report.md (the same, to read).

    facts: "started", "gpus" (nvidia-smi's lines), "device", "torch", "cuda", "python" (torch's view; None
    where no Python with a CUDA torch was found), "pinned_torch" and "limits_s" (each step's limit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**facts, "total_s": round(sum(r.seconds for r in results), 1), "steps": [asdict(r) for r in results]}
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report, results), encoding="utf-8")
    return md_path, json_path
