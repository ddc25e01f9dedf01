"""Every cell on the copy task (lmtrain.tools.synth), against the task's known optimum perplexity.

    python -m lmtrain.tools.compare [--steps N] [--k K[,K...]] [--alphabet A] [--cells lstm,rnn,...] [--out DIR]
                              [--set section.key=value ...]

For each K (a lag of K + 1 steps), writes the copy corpus to OUT/k<K>/data, then trains one model per
entry with the same settings (SETTINGS below, the entry's own keys, then any --set) and the same
number of steps, each into OUT/k<K>/<entry>, an ordinary run directory; the same steps rather than
the same minutes, so that the figures do not depend on the machine or its load. The entries are
the cells of lmtrain.model.cells.CELLS and the VARIANTS below (a cell with an option that changes
what it is). Valid perplexity is that of the run's best.pt with one evaluation stream (see
lmtrain.tools.synth for why), so each figure can be rerun with
`lmtrain evaluate OUT/k<K>/<entry> --split valid --batch-size 1`. Prints a markdown table per K on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from lmtrain.config import load_config
from lmtrain.errors import LmtrainError, require
from lmtrain.evaluation import evaluate
from lmtrain.model import CELLS, count_parameters, load_run
from lmtrain.progress import TerminalProgress
from lmtrain.runtime import resolve_device
from lmtrain.text import encode_corpus, get_tokenizer, load_corpus
from lmtrain.tools.synth import (
    DEFAULT_ALPHABET,
    DEFAULT_K,
    memoryless_perplexity,
    optimum_perplexity,
    write_copy_corpus,
)
from lmtrain.training import start_run, train as train_model

# the lags of `make compare-cells`: a short one that every cell with a memory can bridge, and the
# copy task's default (lmtrain.tools.synth), which separates the cells that hold a symbol for 13 steps
DEFAULT_KS = f"4,{DEFAULT_K}"

# The settings every cell shares; train.bptt is added from K (see settings()).
SETTINGS = [
    "tokenizer.kind=word",
    "model.layers=1",
    "model.embedding_size=32",
    "model.hidden_size=128",
    "train.optimizer=adamw",
    "train.lr=0.003",
    "train.clip=1.0",
    "train.lr_decay=1.0",  # a constant lr: on the long plateau before copying is learnt, validation
                           # stalls and the plateau schedule would cut the lr just before it pays
    "train.batch_size=32",
    "train.epochs=1000",  # train.max_steps (--steps) ends each run
    "train.log_interval=50",
]


# entries beside the cells: the echo-state reservoir (a fixed random rnn, only the embedding and
# decoder trained), the Grid LSTM's block (one layer of it: time's LSTM and depth's transform), and
# the lstm with attention over its last 32 outputs (more than any lag of the task), and the lstm with
# zoneout at Krueger et al.'s character-level rates (h 0.05, c 0.5)
VARIANTS = {
    "reservoir": ["model.cell=rnn", "model.reservoir=true"],
    "grid": ["model.cell=lstm", "model.stack=grid"],
    "lstm+attention": ["model.cell=lstm", "model.attention_window=32"],
    "lstm+zoneout": ["model.cell=lstm", "model.zoneout_hidden=0.05", "model.zoneout_cell=0.5"],
}
ENTRIES = {cell: [f"model.cell={cell}"] for cell in CELLS} | VARIANTS


@dataclass(frozen=True)
class Row:
    cell: str
    parameters: int
    valid_ppl: float
    steps: int
    minutes: float


def settings(k: int, overrides: list[str]) -> list[str]:
    """SETTINGS, a BPTT window of two lines, then the caller's overrides (which win)."""
    return [*SETTINGS, f"train.bptt={2 * (2 * k + 2)}", *overrides]


def compare_cells(
    out_dir: Path, entries: list[str], *, k: int, alphabet_size: int, steps: int,
    n_train: int, n_valid: int, seed: int, overrides: list[str], say=print,
) -> list[Row]:
    """Write the copy corpus, train each entry (of ENTRIES) for `steps` steps, return a Row per entry."""
    data_dir = out_dir / "data"
    write_copy_corpus(data_dir, k=k, alphabet_size=alphabet_size, n_train=n_train, n_valid=n_valid, n_test=n_valid,
                      seed=seed, force=True)  # the comparison's own
    texts = load_corpus(data_dir)
    configs = {
        name: load_config(None, [*ENTRIES[name], f"train.seed={seed}", f"train.max_steps={steps}", *settings(k, overrides)])
        for name in entries
    }
    shared = configs[entries[0]].tokenizer  # the tokenizer settings are the same for every cell
    tokenizer = get_tokenizer(texts.splits["train"], shared.kind, shared.vocab_size, shared.sample_lines)
    data = encode_corpus(tokenizer, texts.splits)
    rows = []
    for cell, cfg in configs.items():
        run_dir = out_dir / cell
        device = resolve_device(cfg.train.device)
        with ExitStack() as hold:  # the run directory stays locked while it trains
            model, info = start_run(run_dir, cfg, tokenizer, corpus_source=texts.source, force=True, device=device, hold=hold)
            say(f"{cell}: {count_parameters(model):,} parameters, {cfg.train.max_steps:,} steps -> {run_dir}")
            started = time.perf_counter()
            train_model(model, cfg, data, run_dir, info, progress=TerminalProgress())
            elapsed = time.perf_counter() - started
        best = load_run(run_dir, device)
        valid = evaluate(best.model, data["valid"], 1, cfg.train.bptt)  # one stream: see lmtrain.tools.synth
        rows.append(Row(cell, count_parameters(model), valid["ppl"], cfg.train.max_steps, elapsed / 60))
        say(f"{cell}: valid ppl {valid['ppl']:.3f} (optimum {optimum_perplexity(k, alphabet_size):.3f}) in {elapsed / 60:.1f} min")
    return rows


def format_table(rows: list[Row], optimum: float) -> str:
    """A markdown table: cell | parameters | valid ppl | optimum | steps | minutes."""
    lines = [
        "| cell | parameters | valid ppl | optimum | steps | minutes |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.cell} | {r.parameters:,} | {r.valid_ppl:.3f} | {optimum:.3f} | {r.steps:,} | {r.minutes:.1f} |")
    return "\n".join(lines)


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmtrain.tools.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps per cell (default 3000)")
    parser.add_argument("--k", default=DEFAULT_KS, help=f"symbols per half line, comma-separated: a table each (default {DEFAULT_KS})")
    parser.add_argument("--alphabet", type=int, default=DEFAULT_ALPHABET, help=f"alphabet size (default {DEFAULT_ALPHABET})")
    parser.add_argument("--lines", type=int, default=40000, help="training lines (default 40000)")
    parser.add_argument("--valid-lines", type=int, default=500, help="valid and test lines (default 500)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the corpus and of every model (default 1)")
    parser.add_argument("--cells", default=",".join(ENTRIES), help=f"comma-separated cells and variants (default: all, {','.join(ENTRIES)})")
    parser.add_argument("--out", type=Path, default=Path("runs/compare-cells"), help="corpus and runs (default runs/compare-cells)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one of the shared settings (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these models are too small to gain from more, and lose much on a shared CPU)")
    args = parser.parse_args(argv)
    try:
        cells = [c.strip() for c in args.cells.split(",") if c.strip()]
        unknown = [c for c in cells if c not in ENTRIES]
        if unknown or not cells:
            raise LmtrainError(f"--cells: unknown cell(s) {', '.join(unknown) or '(none given)'} (known: {', '.join(ENTRIES)})")
        ks = parse_ks(args.k)
        require(
            (args.steps >= 1, f"--steps must be at least 1, got {args.steps}"),
            (args.alphabet >= 2, f"--alphabet must be at least 2, got {args.alphabet}"),
            (args.lines >= 1 and args.valid_lines >= 1, "--lines and --valid-lines must be at least 1"),
            (args.threads >= 1, f"--threads must be at least 1, got {args.threads}"),
        )
        torch.set_num_threads(args.threads)
        started = time.perf_counter()
        tables = {k: compare_cells(args.out / f"k{k}", cells, k=k, alphabet_size=args.alphabet, steps=args.steps,
                                   n_train=args.lines, n_valid=args.valid_lines, seed=args.seed,
                                   overrides=args.overrides, say=to_stderr) for k in ks}
    except LmtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, rows in tables.items():
        optimum = optimum_perplexity(k, args.alphabet)
        print(f"\nCopy task: K = {k} (a lag of {k + 1} steps), alphabet {args.alphabet}; optimum ppl {optimum:.3f} "
              f"(no memory: {memoryless_perplexity(k, args.alphabet):.3f}). Valid ppl: best.pt, one stream.\n")
        print(format_table(rows, optimum))
    print(f"\n{(time.perf_counter() - started) / 60:.1f} minutes in all")
    return 0


def parse_ks(text: str) -> list[int]:
    """--k "4,12" -> [4, 12]; each at least 1."""
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise LmtrainError(f"--k takes whole numbers, comma-separated, got '{text}'") from None
    if not ks or min(ks) < 1:
        raise LmtrainError(f"--k: each K must be at least 1, got '{text}'")
    return ks


if __name__ == "__main__":
    sys.exit(main())
