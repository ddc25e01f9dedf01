"""Reproduction runs: train a published setup from configs/, score it, and record the result.

    reproduce("ptb-small", data_dir, ...)        configs/ptb-small.toml on DATA/ptb
        -> RUN/ (as `lmtrain train` writes it)  -> valid and test perplexity of RUN/best.pt
        -> results/ptb-small.json

Valid and test are scored as one stream each (batch size 1, float32): every token is predicted
with all the text before it as context, as Zaremba et al. score their test set and AWD-LSTM
its test set. `results_table` prints every setup beside its published numbers, "not yet run"
where results/ has no file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain import runs
from lmtrain.atomic import atomic_open
from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import given_keys, load_config, to_dict
from lmtrain.errors import LmtrainError
from lmtrain.evaluation import evaluate
from lmtrain.model import count_parameters
from lmtrain.progress import QuietProgress
from lmtrain.training import prepare_run, train

EVAL_BATCH_SIZE = 1


@dataclass(frozen=True)
class Published:
    corpus: str  # the folder under DATA
    valid: float | None
    test: float | None
    source: str
    unit: str = "ppl"  # what valid and test are: perplexity, or "bpc" (bits per character)


PUBLISHED: dict[str, Published] = {
    "ptb-small": Published("ptb", 120.7, 114.5, "Zaremba et al. 2014, Table 1, non-regularized LSTM"),
    "ptb-medium": Published("ptb", 86.2, 82.7, "Zaremba et al. 2014, Table 1, medium regularized LSTM"),
    "ptb-large": Published("ptb", 82.2, 78.4, "Zaremba et al. 2014, Table 1, large regularized LSTM"),
    "ptb-small-best": Published("ptb", None, 112.4,
                                "Press & Wolf 2017, small model with tied weights (our target: test <= 105 in 45 min on 2 CPU cores)"),
    "ptb-qrnn-small": Published("ptb", None, None,
                                "ours: a 2-layer qrnn of at most 4.7 M parameters in 45 min on 2 CPU cores (compare ptb-small-best)"),
    "ptb-zoneout-small": Published("ptb", None, None,
                                   "ours: ptb-small-best with zoneout (c 0.5, h 0.05) in 45 min on 2 CPU cores (compare ptb-small-best)"),
    "ptb-awd": Published("ptb", 60.0, 57.3,
                         "Merity et al. 2017, AWD-LSTM (paper, after fine-tuning; its README gives 58.8 test before)"),
    "ptb-awd-qrnn": Published("ptb", 60.6, 58.3,
                              "Merity et al. 2017, AWD-LSTM's QRNN (salesforce/awd-lstm-lm README, after fine-tuning)"),
    "ptb-mogrifier": Published("ptb", 51.4, 50.1, "Melis et al. 2020, Mogrifier LSTM 24M (no dynamic evaluation)"),
    "ptb-char-small": Published("ptb", None, 1.27,
                                "Krueger et al. 2017, zoneout LSTM of 1000 units on character-level PTB (our target: test <= 1.40 "
                                "bpc in 30 min on 2 CPU cores); PTB's word-level text read as characters", unit="bpc"),
    "wt2-awd": Published("wikitext-2", 68.6, 65.8, "Merity et al. 2017, AWD-LSTM on WikiText-2 (paper, after fine-tuning)"),
    "wt2-medium-tied": Published("wikitext-2", None, None,
                                 "PyTorch word_language_model example (its README gives the command, no WikiText-2 figure)"),
}


def config_path(name: str, config_dir: Path) -> Path:
    if name not in PUBLISHED:
        raise LmtrainError(f"unknown reproduction '{name}' (known: {', '.join(PUBLISHED)})")
    path = config_dir / f"{name}.toml"
    if not path.is_file():
        raise LmtrainError(f"config {path} not found (run from the repository root, or pass --config-dir)")
    return path


def reproduce(name: str, data_dir: Path, *, config_dir: Path, runs_dir: Path, results_dir: Path,
              overrides: list[str] = (), progress=None, say=lambda line: None, force: bool = False) -> dict[str, Any]:
    """Train configs/NAME.toml on DATA/<corpus>, score valid and test, write results/NAME.json.
    An earlier reproduction's run directory (its checkpoints) is replaced only with `force`."""
    published = PUBLISHED.get(name)
    path = config_path(name, config_dir)
    corpus = data_dir / published.corpus
    if not corpus.is_dir():
        raise LmtrainError(f"{corpus} not found: DATA must hold ptb/ and wikitext-2/ (make data fills data/)")
    config = load_config(path, list(overrides))
    began = time.perf_counter()  # a budget (train.max_minutes) counts from here, as for `lmtrain train`
    run_dir = runs_dir / f"reproduce-{name}"
    if not force and run_dir.is_dir() and not runs.is_empty(run_dir):
        raise LmtrainError(f"{run_dir} holds an earlier reproduction of {name}: pass --force to replace it "
                           f"(make reproduce-{name} FORCE=1), or move it away first")
    with ExitStack() as hold:  # the run directory stays locked until it is trained and scored
        # --force as `lmtrain train --force`: only lmtrain's files go, and only from a run (lmtrain.runs)
        # a config with model.size = "auto" has the keys it leaves out sized to its budget, as the CLI's would
        model, config, data, info = prepare_run(corpus, config, run_dir, force=force, default_run_dir=None, say=say,
                                                hold=hold, given=given_keys(path, list(overrides)), started=began)
        info.pop("run_dir")
        started = time.perf_counter()
        last = train(model, config, data, run_dir, info, progress=progress or QuietProgress(), started=began)
        train_minutes = (time.perf_counter() - started) / 60
        model.load_state_dict(load_checkpoint(run_dir / "best.pt")["model"])
        scores = {split: evaluate(model, data[split], EVAL_BATCH_SIZE, config.train.bptt) for split in ("valid", "test")}
    result = {
        "name": name,
        "config": to_dict(config),
        "overrides": list(overrides),
        "corpus": str(corpus),
        "parameters": count_parameters(model),
        "epochs": last["epoch"],
        "steps": last["step"],
        "train_minutes": round(train_minutes, 2),
        "device": device_name(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "valid_ppl": round(scores["valid"]["ppl"], 2),
        "test_ppl": round(scores["test"]["ppl"], 2),
        "valid_bpc": rounded(scores["valid"]["bits_per_char"], 4),
        "test_bpc": rounded(scores["test"]["bits_per_char"], 4),
        "eval_batch_size": EVAL_BATCH_SIZE,
        "published": {f"valid_{published.unit}": published.valid, f"test_{published.unit}": published.test,
                      "source": published.source},
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(results_dir / f"{name}.json") as f:
        f.write((json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def read_result(path: Path) -> dict[str, Any]:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmtrainError(f"{path}: not a reproduction result ({type(e).__name__})") from None
    needed = ("valid_ppl", "test_ppl", "parameters", "epochs", "train_minutes", "device", "threads")
    if not isinstance(result, dict) or any(key not in result for key in needed):
        raise LmtrainError(f"{path}: not a reproduction result (it lacks one of {', '.join(needed)})")
    return result


def results_table(results_dir: Path) -> str:
    """One markdown table: every setup of PUBLISHED with our figures beside the published ones."""
    rows = [
        "| setup | published valid / test | ours valid / test | parameters | epochs | train minutes | device | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, published in PUBLISHED.items():
        path = results_dir / f"{name}.json"
        decimals = 1 if published.unit == "ppl" else 2
        paper = f"{fmt(published.valid, decimals)} / {fmt(published.test, decimals)}"
        if not path.is_file():
            rows.append(f"| {name} | {paper} | not yet run | | | | | {published.source} |")
            continue
        r = read_result(path)
        unit = published.unit
        if unit != "ppl":
            paper += f" {unit}"
        ours = f"{fmt(r['valid_ppl'])} / {fmt(r['test_ppl'])}" if unit == "ppl" else \
            f"{fmt(r.get('valid_' + unit), 3)} / {fmt(r.get('test_' + unit), 3)} {unit}"
        rows.append(
            f"| {name} | {paper} | {ours} | {r['parameters'] / 1e6:.2f} M | "
            f"{r['epochs']} | {r['train_minutes']:.1f} | {r['device']}, {r['threads']} threads | {published.source} |"
        )
    return "\n".join(rows)


def fmt(value: float | None, decimals: int = 1) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{decimals}f}"


def rounded(value: float | None, decimals: int) -> float | None:
    return None if value is None else round(value, decimals)
