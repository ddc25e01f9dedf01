"""`lmtrain bench --loop`: the whole training loop of `lmtrain train` against a plain loop written
as the PyTorch word-language-model example writes its own, same config, interleaved rounds, each
loop in a fresh process of its own, as the two programs run.

    ours:   lmtrain.training.train as `lmtrain train` runs it: windows from the token file's
            memmap, dropout, the step, clipping, the optimizer, the non-finite checks, logging
            to metrics.jsonl and timing.jsonl, the progress bar (drawn into memory), periodic
            checkpoints
    plain:  nn.Embedding -> dropout -> nn.LSTM -> dropout -> nn.Linear, CrossEntropyLoss,
            clip_grad_norm_, the manual SGD update, `loss.item()` per step, on the same token ids
            laid out as batchify lays them out (the example's own loop)

Both run the example's configuration (LOOP_SETTINGS: 2 x 200, dropout 0.2, SGD lr 20, clip 0.25,
bptt 35, batch 20) on the same corpus and vocabulary. A round trains each for `warmup + steps`
training steps; tokens/s counts the last `steps` of them (from the progress callback, so start-up
and the final validation are outside). A loop's figure is its median over the rounds, and `vs
plain` the median of each round's ratio to the plain loop of the same round (the pairs run
minutes apart at most, so the machine's drift cancels); `lmtrain train`'s own tokens/s (the mean
of timing.jsonl's train records) is reported beside it.

Each loop runs in a child process (`python -m lmtrain.tools.bench_loop`, `run_child`) set up as its
program is: ours as the console script sets itself up (lmtrain.runtime.keep_freed_memory), the
plain one with Python's and torch's defaults. One process for both would give the plain loop our
process's settings, which the example's `main.py` does not have.
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from lmtrain.config import Config, load_config
from lmtrain.errors import LmtrainError, one_line
from lmtrain.progress import TerminalProgress
from lmtrain.runtime import keep_freed_memory
from lmtrain.text import EOS_ID, batchify
from lmtrain.training import prepare_run, train

# the PyTorch example's own settings (word_language_model/main.py's defaults, its LSTM)
LOOP_SETTINGS = [
    "tokenizer.kind=word", "tokenizer.vocab_size=10000", "model.layers=2", "model.embedding_size=200",
    "model.hidden_size=200", "model.dropout=0.2", "model.tie_weights=false", "train.optimizer=sgd", "train.lr=20",
    "train.clip=0.25", "train.bptt=35", "train.batch_size=20", "train.variable_bptt=false", "train.log_interval=200",
]


@dataclass
class LoopRecord:
    impl: str  # "ours" or "plain"
    precision: str  # ours: train.precision; plain: always fp32, as the example runs
    tokens_per_s: float  # median over rounds
    ratio_vs_plain: float  # ours / plain (fp32), same rounds
    timing_tokens_per_s: float | None  # ours: lmtrain train's own report (timing.jsonl), median over rounds
    steps: int
    rounds: int


class StepClock(TerminalProgress):
    """The real progress bar, drawn into memory, that also notes when each training step ended."""

    def __init__(self):
        super().__init__(stream=io.StringIO())
        self.times: list[float] = []

    def step(self, loss: float, tokens_per_s: float, lr: float) -> None:
        super().step(loss, tokens_per_s, lr)
        self.times.append(time.perf_counter())


def synthetic_corpus(folder: Path, words: int = 10_000, tokens: int = 400_000, seed: int = 0) -> Path:
    """train/valid/test of Zipf-distributed made-up words, lines of 20: a corpus with the example's
    vocabulary size for when no corpus is given (no third-party text)."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(words)])
    ranks = np.arange(1, words + 1)
    p = (1.0 / ranks) / (1.0 / ranks).sum()
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", tokens), ("valid", tokens // 20), ("test", tokens // 20)):
        ids = rng.choice(words, size=n, p=p)
        lines = [" ".join(vocab[ids[i : i + 20]]) for i in range(0, n, 20)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


class ExampleModel(nn.Module):
    """The example's RNNModel with its LSTM: embedding, dropout, nn.LSTM, dropout, linear."""

    def __init__(self, vocab: int, size: int, layers: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = nn.LSTM(size, size, layers, dropout=dropout)
        self.decoder = nn.Linear(size, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def forward(self, x, state):
        out, state = self.rnn(self.drop(self.encoder(x)), state)
        return self.decoder(self.drop(out)).view(-1, self.decoder.out_features), state


def plain_loop(config: Config, tokens: np.ndarray, vocab: int, total_steps: int) -> list[float]:
    """The example's training loop for `total_steps` steps -> the time each step ended."""
    m, tc = config.model, config.train
    torch.manual_seed(tc.seed)
    model = ExampleModel(vocab, m.hidden_size, m.layers, m.dropout).train()
    inputs, targets = batchify(tokens, tc.batch_size, EOS_ID)  # (N, B)
    criterion = nn.CrossEntropyLoss()
    state = tuple(torch.zeros(m.layers, tc.batch_size, m.hidden_size) for _ in range(2))
    times, total_loss, i = [], 0.0, 0
    for _ in range(total_steps):
        if i + tc.bptt > inputs.size(0):
            i = 0
        x, y = inputs[i : i + tc.bptt], targets[i : i + tc.bptt].reshape(-1)
        i += tc.bptt
        state = tuple(s.detach() for s in state)
        model.zero_grad()
        output, state = model(x, state)
        loss = criterion(output, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-tc.lr)
        total_loss += loss.item()
        times.append(time.perf_counter())
    return times


def our_loop(corpus: Path, settings: list[str], root: Path, total_steps: int) -> tuple[list[float], float | None]:
    """lmtrain's training loop for `total_steps` steps in a fresh run directory -> the time each
    step ended, and the tokens/s its timing.jsonl reports (mean of the train records)."""
    config = load_config(None, [*settings, f"train.max_steps={total_steps}"])
    run_dir = Path(tempfile.mkdtemp(dir=root, prefix="run-"))
    model, config, data, info = prepare_run(corpus, config, run_dir, force=True, default_run_dir=None, say=lambda line: None)
    info.pop("run_dir", None)
    clock = StepClock()
    train(model, config, data, run_dir, info, progress=clock)
    timing = [json.loads(line) for line in (run_dir / "timing.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in timing if r.get("kind") == "train" and "tokens_per_s" in r]
    return clock.times, (statistics.mean(rates) if rates else None)


def run_child(impl: str, corpus: Path, root: Path, settings: list[str], total_steps: int,
              vocab: int = 0) -> tuple[list[float], float | None]:
    """One loop in a fresh Python process (`main` below) -> what plain_loop / our_loop return; the
    plain loop reads the token ids bench_loop saved in `root` and needs their `vocab` size."""
    request = root / f"request-{impl}.json"
    request.write_text(json.dumps({"impl": impl, "corpus": str(corpus), "root": str(root), "settings": settings,
                                   "steps": total_steps, "vocab": vocab}), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "lmtrain.tools.bench_loop", str(request)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise LmtrainError(f"the {impl} loop's process failed: {one_line(done.stderr.strip()[-500:] or done.returncode)}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return answer["times"], answer["own"]


def main(request_path: str) -> None:
    """A child's side of run_child: read the request, run the loop, print its times as one JSON line."""
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    corpus, root, settings = Path(request["corpus"]), Path(request["root"]), request["settings"]
    if request["impl"] == "plain":
        config = load_config(None, settings)
        tokens = np.load(root / "train-tokens.npy")
        times, own = plain_loop(config, tokens, request["vocab"], request["steps"]), None
    else:
        keep_freed_memory()  # as lmtrain.cli.main does before any command
        times, own = our_loop(corpus, settings, root, request["steps"])
    print(json.dumps({"times": times, "own": own}))


def rate(times: list[float], warmup: int, tokens_per_step: int) -> float:
    """Tokens/s over the steps after the first `warmup` ones."""
    return (len(times) - warmup) * tokens_per_step / (times[-1] - times[warmup - 1])


def bench_loop(corpus: Path | None, precisions: list[str], *, steps: int, warmup: int, rounds: int,
               say: Callable[[str], None] = lambda line: None) -> list[LoopRecord]:
    """Interleaved rounds of the plain loop and ours in each of `precisions` (see the module doc)."""
    with tempfile.TemporaryDirectory(prefix="lmtrain-bench-loop-") as tmp:
        root = Path(tmp)
        corpus = corpus or synthetic_corpus(root / "corpus")
        config = load_config(None, LOOP_SETTINGS)
        _, _, data, _ = prepare_run(corpus, config, root / "tokens", force=True, default_run_dir=None, say=say)
        np.save(root / "train-tokens.npy", np.asarray(data["train"].tokens))
        per_step = config.train.bptt * config.train.batch_size
        total = warmup + steps
        plain, ours, reported = [], {p: [] for p in precisions}, {p: [] for p in precisions}
        ratios = {p: [] for p in precisions}
        for r in range(rounds):
            plain.append(rate(run_child("plain", corpus, root, LOOP_SETTINGS, total, data["train"].vocab_size)[0], warmup, per_step))
            for precision in precisions:
                times, own = run_child("ours", corpus, root, [*LOOP_SETTINGS, f"train.precision={precision}"], total)
                ours[precision].append(rate(times, warmup, per_step))
                ratios[precision].append(ours[precision][-1] / plain[-1])
                reported[precision].append(own)
            say(f"round {r + 1}/{rounds}: plain {plain[-1]:,.0f} tok/s, "
                + ", ".join(f"ours {p} {ours[p][-1]:,.0f}" for p in precisions))
    base = statistics.median(plain)
    records = [LoopRecord("plain", "fp32", base, 1.0, None, steps, rounds)]
    for p in precisions:
        own = [v for v in reported[p] if v is not None]
        records.append(LoopRecord("ours", p, statistics.median(ours[p]), statistics.median(ratios[p]),
                                  statistics.median(own) if own else None, steps, rounds))
    return records


def format_loop_table(records: list[LoopRecord]) -> str:
    lines = ["| loop | precision | tokens/s | vs plain | lmtrain's timing.jsonl |", "|---|---|---:|---:|---:|"]
    for r in records:
        own = f"{r.timing_tokens_per_s:,.0f}" if r.timing_tokens_per_s is not None else ""
        lines.append(f"| {r.impl} | {r.precision} | {r.tokens_per_s:,.0f} | {r.ratio_vs_plain:.2f} | {own} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1])
