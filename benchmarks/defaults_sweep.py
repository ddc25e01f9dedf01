"""The bare command against the alternatives at equal wall time: `lmtrain train CORPUS --minutes M`
(model.size = auto and the defaults), beside the same budget with the model one width narrower and
one wider than auto chose (or a width given: width-256), other learning rates, and the defaults before issue 21 (SGD lr 1, no
dropout, fp32, 2 x 200). Each run is a subprocess given M minutes; each is scored by `lmtrain
evaluate RUN --json` on the corpus's test split in bits per byte (comparable across tokenizers).

    .venv/bin/python benchmarks/defaults_sweep.py [--minutes 5] [--corpora builtin,../shared/data/ptb]
        [--variants bare,narrower,wider,width-256,lr-0.001,lr-0.01,old-defaults] [--out runs/sweep]

Variants run one after the other within a corpus (the bare one first: the others take its width);
one run each, so a drift of this machine's speed between runs is in the figures. Writes OUT/sweep.jsonl (one record per run) and
prints the markdown table of docs/defaults.md. Nothing else may run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from lmtrain.training.autosize import WIDTHS

LMTRAIN = [sys.executable, "-m", "lmtrain"]
OLD_DEFAULTS = ["model.size=fixed", "train.optimizer=sgd", "train.lr=1.0", "model.dropout=0.0", "train.precision=fp32"]


def variant_sets(name: str, bare_width: int | None) -> list[str]:
    """The --set items of a variant; `bare_width`: the hidden size the bare run's auto sizing chose."""
    if name == "bare":
        return []
    if name == "old-defaults":
        return OLD_DEFAULTS
    if name.startswith("lr-"):
        return [f"train.lr={float(name[3:])}"]
    if name in ("narrower", "wider") or name.startswith("width-"):
        if name.startswith("width-"):
            width = int(name[6:])
        else:
            at = WIDTHS.index(bare_width) + (-1 if name == "narrower" else 1)
            width = WIDTHS[min(max(at, 0), len(WIDTHS) - 1)]
        return [f"model.hidden_size={width}", f"model.embedding_size={width}", "model.tie_weights=true", "model.layers=2"]
    raise SystemExit(f"unknown variant {name!r}")


def run_one(corpus: str, name: str, items: list[str], minutes: float, run_dir: Path) -> dict:
    where = [] if corpus == "builtin" else [corpus]
    sets = [arg for item in items for arg in ("--set", item)]
    started = time.perf_counter()
    train = subprocess.run([*LMTRAIN, "train", *where, "--minutes", str(minutes), "--run-dir", str(run_dir), "--force", *sets],
                           capture_output=True, text=True)
    wall = time.perf_counter() - started
    if train.returncode != 0:
        return {"corpus": corpus, "variant": name, "error": train.stderr.strip().splitlines()[-1:]}
    scored = subprocess.run([*LMTRAIN, "evaluate", str(run_dir), "--json"], capture_output=True, text=True, check=True)
    report = json.loads(scored.stdout)
    config = tomllib.loads((run_dir / "config.toml").read_text())
    return {"corpus": corpus, "variant": name, "sets": items, "minutes": minutes, "wall_s": round(wall, 1),
            "overshoot_s": round(wall - 60 * minutes, 1), "test_bpb": report["bits_per_byte"], "test_ppl": report["ppl"],
            "hidden_size": config["model"]["hidden_size"], "layers": config["model"]["layers"],
            "dropout": config["model"]["dropout"], "precision": config["train"]["precision"],
            "steps": config["train"]["max_steps"] or None}


def table(records: list[dict]) -> str:
    lines = ["| corpus | variant | model | dropout | test bits/byte | vs best | wall s (over budget) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for corpus in dict.fromkeys(r["corpus"] for r in records):
        rows = [r for r in records if r["corpus"] == corpus and "test_bpb" in r]
        best = min(r["test_bpb"] for r in rows)
        for r in rows:
            lines.append(f"| {Path(corpus).name} | {r['variant']} | {r['layers']} x {r['hidden_size']} {r['precision']} | "
                         f"{r['dropout']:g} | {r['test_bpb']:.4f} | {100 * (r['test_bpb'] / best - 1):+.1f} % | "
                         f"{r['wall_s']:.0f} ({r['overshoot_s']:+.0f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--corpora", default="builtin,../shared/data/ptb")
    parser.add_argument("--variants", default="bare,narrower,wider,lr-0.001,lr-0.01,old-defaults")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for corpus in args.corpora.split(","):
        bare_width = None
        for name in args.variants.split(","):
            run_dir = args.out / f"{Path(corpus).name}-{name}"
            record = run_one(corpus, name, variant_sets(name, bare_width), args.minutes, run_dir)
            if name == "bare":
                bare_width = record.get("hidden_size")
            records.append(record)
            print(json.dumps(record), flush=True)
            with open(args.out / "sweep.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    print(table(records))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
