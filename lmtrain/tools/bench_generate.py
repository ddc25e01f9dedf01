"""`lmtrain bench --generate`: sampling speed (lmtrain.generation) per weight precision and number of
streams, interleaved as in lmtrain.tools.bench; with a run, the test perplexity each precision
gives when it scores the run's test split; and evaluation's throughput (`total_nll`, as `lmtrain
evaluate` runs it) against the forward half of a training step on the same windows."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtrain.config import ModelConfig
from lmtrain.evaluation import total_nll
from lmtrain.generation import SampleSettings, Sampler, Stepper, StreamRandom
from lmtrain.model import LanguageModel, cross_entropy, load_run
from lmtrain.text import BUILTIN, EOS_ID, batchify, encode_split, load_corpus
from lmtrain.tools.bench_timing import time_round_robin


@dataclass
class GenerationRecord:
    what: str  # "generate", or "evaluate" / "train forward" (same windows)
    precision: str
    streams: int
    tokens_per_s: float
    test_ppl: float | None = None  # with a run: its test split scored through the stepper
    ratio: float | None = None  # evaluate: its time per token / the training forward's


def draw_tokens(sampler: Sampler, streams: int, tokens: int) -> Callable[[], None]:
    """A run that samples `tokens` steps for `streams` streams from a fresh `sampler` (each call
    goes on from the last)."""
    sampler.feed([EOS_ID])
    sampler.expand(streams)
    random = StreamRandom(0, streams)

    def run():
        for _ in sampler.draw(SampleSettings(max_tokens=tokens), random):
            pass

    return run


def bench_generation(model: LanguageModel, precisions: list[str], stream_counts: list[int], tokens: int,
                     repeats: int, warmup: int) -> list[GenerationRecord]:
    """Sampling tokens/s (summed over streams) per precision, the precisions interleaved. Where
    the model's step is one compiled op (an LSTM stack), the last precision is also timed op by
    op ("generate, op by op"), as the reference for that op."""
    records = []
    for streams in stream_counts:
        samplers = {("generate", p): Sampler(model, p) for p in precisions}
        if samplers["generate", precisions[-1]].stepper.stack is not None:
            op_by_op = Sampler(model, precisions[-1])
            op_by_op.stepper.unfused = True
            samplers["generate, op by op", precisions[-1]] = op_by_op
        runs = {key: draw_tokens(sampler, streams, tokens) for key, sampler in samplers.items()}
        medians = time_round_robin(runs, repeats, warmup, torch.device("cpu"))
        records += [GenerationRecord(what, p, streams, streams * tokens / medians[what, p]) for what, p in runs]
    return records


@torch.no_grad()
def stepped_perplexity(model: LanguageModel, tokens: np.ndarray, precision: str, streams: int = 16) -> float:
    """Perplexity of `tokens` scored one step at a time through the stepper, as `streams`
    contiguous streams from a zero state (the evaluate layout, without padding: the tail that does
    not fill a row is left out)."""
    stepper = Stepper(model, precision)
    inputs, targets = batchify(tokens, streams, EOS_ID)
    state = model.init_state(streams)
    total = 0.0
    for x, y in zip(inputs, targets):
        logits, state = stepper.step(x, state)
        total -= torch.log_softmax(logits.double(), -1).gather(1, y.view(-1, 1)).sum().item()
    return math.exp(total / targets.numel())


def bench_evaluation(model: LanguageModel, batch: int, bptt: int, windows: int, repeats: int,
                     warmup: int) -> list[GenerationRecord]:
    """`total_nll` (evaluation) against the forward half of a training step over the same
    `windows` windows of (bptt, batch) tokens; tokens/s of each and evaluation's time ratio."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (windows * bptt * batch,), generator=generator)
    inputs, targets = batchify(tokens.numpy(), batch, EOS_ID)

    def evaluate():
        total_nll(model, tokens.numpy(), batch, bptt)

    def train_forward():
        model.train()
        state = model.init_state(batch)
        with torch.no_grad():  # the forward half only; the graph would be freed unused anyway
            for start in range(0, inputs.size(0), bptt):
                _, dropped, state = model.hidden(inputs[start : start + bptt], state)
                logits = model.decode(dropped)
                cross_entropy(logits.view(-1, logits.size(-1)), targets[start : start + bptt].reshape(-1)).mean()
        model.eval()

    medians = time_round_robin({"evaluate": evaluate, "train forward": train_forward}, repeats, warmup, torch.device("cpu"))
    n = tokens.numel()
    return [
        GenerationRecord("evaluate", "fp32", batch, n / medians["evaluate"], ratio=medians["evaluate"] / medians["train forward"]),
        GenerationRecord("train forward", "fp32", batch, n / medians["train forward"]),
    ]


def format_generation_table(records: list[GenerationRecord]) -> str:
    lines = ["| what | precision | streams | tokens/s | test ppl | time / train forward |", "|---|---|---:|---:|---:|---:|"]
    for r in records:
        ppl = f"{r.test_ppl:.3f}" if r.test_ppl is not None else ""
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        lines.append(f"| {r.what} | {r.precision} | {r.streams} | {r.tokens_per_s:,.0f} | {ppl} | {ratio} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class GenerationBench:
    """What `lmtrain bench --generate` measures: the weight precisions, stream counts and tokens
    per stream of sampling, the windows (batch x bptt) of evaluation, and the model: `run`'s, or a
    random one of `layers` x `hidden` over `vocab_size` words when run is None."""
    precisions: list[str]
    stream_counts: list[int]
    tokens: int
    repeats: int
    warmup: int
    batch_size: int
    bptt: int
    run: Path | None = None
    layers: int = 2
    hidden: int = 650
    vocab_size: int = 10_000


def measure_generation(bench: GenerationBench, warn: Callable[[str], None]) -> tuple[str, list[GenerationRecord]]:
    """(what was measured, in words; the records): sampling per precision and stream count, with
    each precision's test perplexity when `bench.run`'s corpus is still there, then evaluation."""
    test_tokens = None
    if bench.run is not None:
        loaded = load_run(bench.run, torch.device("cpu"))
        model, label = loaded.model, f"run {bench.run}"
        if loaded.corpus != BUILTIN and not Path(loaded.corpus).exists():
            warn(f"note: the run's corpus {loaded.corpus} is gone; no test perplexity")
        else:
            corpus = load_corpus(None if loaded.corpus == BUILTIN else Path(loaded.corpus))
            test_tokens = encode_split(loaded.tokenizer, corpus.splits["test"]).tokens
    else:
        torch.manual_seed(0)
        shape = ModelConfig(layers=bench.layers, embedding_size=bench.hidden, hidden_size=bench.hidden)
        model = LanguageModel(shape, bench.vocab_size).eval()
        label = f"random {bench.layers} x {bench.hidden}, vocabulary {bench.vocab_size:,}"
    records = bench_generation(model, bench.precisions, bench.stream_counts, bench.tokens, bench.repeats, bench.warmup)
    if test_tokens is not None:
        ppl = {p: stepped_perplexity(model, test_tokens, p) for p in bench.precisions}
        records = [dataclasses.replace(r, test_ppl=ppl[r.precision]) for r in records]
    records += bench_evaluation(model, bench.batch_size, bench.bptt, 10, bench.repeats, bench.warmup)
    return label, records
