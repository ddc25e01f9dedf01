"""Training throughput of one process against `lmtrain train --nproc N`, and the cost of summing
the logged losses over ranks at every step (train.log_interval=1) rather than every 100.

Each variant is a whole `python -m lmtrain train` run of the same config (configs/demo.toml with
a step limit, dropout off) on the built-in corpus; its figure is the epoch record's tokens/s in
timing.jsonl (training steps only: no start-up, no validation). The variants run round-robin, one
repeat of each in turn, after a short warm-up run that fills the tokenizer and token caches,
so a slow moment of a shared machine hits all of them alike; the figure is the median.

    python benchmarks/distributed.py [--repeats 3] [--steps 30] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def variants(nproc: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Name -> the extra arguments of `lmtrain train` and environment variables for that variant.
    One process runs once with torch's default threads (one per core) and once with one thread,
    the threads each rank gets when there are as many ranks as cores."""
    return {
        "1 process, default threads, log every 100 steps": (["--set", "train.log_interval=100"], {}),
        "1 process, 1 thread, log every 100 steps": (["--set", "train.log_interval=100"], {"OMP_NUM_THREADS": "1"}),
        f"{nproc} processes, log every 100 steps": (["--nproc", str(nproc), "--set", "train.log_interval=100"], {}),
        f"{nproc} processes, log every step": (["--nproc", str(nproc), "--set", "train.log_interval=1"], {}),
    }


def run_once(extra: list[str], env: dict[str, str], steps: int, run_dir: Path) -> float:
    """Train once; the tokens/s (over all ranks) of its first epoch, or of the stretch up to
    train.max_steps when that ends mid-epoch (a "stop" record), from timing.jsonl."""
    command = [sys.executable, "-m", "lmtrain", "train", "--config", str(ROOT / "configs/demo.toml"),
               "--run-dir", str(run_dir), "--force", "--set", f"train.max_steps={steps}",
               "--set", "model.dropout=0", *extra]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **env})
    records = [json.loads(line) for line in (run_dir / "timing.jsonl").read_text().splitlines()]
    return next(r["tokens_per_s"] for r in records if r["kind"] in ("epoch", "stop"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    runs = variants(args.nproc)
    figures: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as scratch:
        run_once(*runs[f"{args.nproc} processes, log every 100 steps"], 5, Path(scratch) / "run")  # fills the caches
        for _ in range(args.repeats):
            for name, (extra, env) in runs.items():
                figures[name].append(run_once(extra, env, args.steps, Path(scratch) / "run"))
    base = statistics.median(next(iter(figures.values())))
    print("| variant | tokens/s (median) | repeats | vs the first row |")
    print("|---|---:|---|---:|")
    for name, values in figures.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {', '.join(f'{v:,.0f}' for v in values)} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
