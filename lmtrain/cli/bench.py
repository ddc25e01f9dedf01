"""`lmtrain bench`: training and sampling throughput (lmtrain.tools.bench)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from lmtrain.cli.app import app, say, user_errors
from lmtrain.errors import LmtrainError, require
from lmtrain.runtime import resolve_device


@app.command()
def bench(
    cells: Annotated[str, typer.Option(help="Our cells to time, comma-separated, or 'all'; each against its torch module (lstm: torch.nn.LSTM, gru: torch.nn.GRU, rnn: torch.nn.RNN with tanh; the others torch.nn.LSTM) and our lstm (timed beside a cell that extends it, as the mogrifier and dglstm do).")] = "all",
    sizes: Annotated[str, typer.Option(help="Hidden sizes (= input sizes), comma-separated.")] = "200,650",
    dtypes: Annotated[str, typer.Option(help="fp32, bf16 (mixed precision: ours with train.precision = bf16, PyTorch's modules under torch.autocast) or both, comma-separated.")] = "fp32,bf16",
    layers: Annotated[int, typer.Option(help="Stacked layers.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Parallel streams.")] = 20,
    bptt: Annotated[int, typer.Option(help="Time steps per window.")] = 35,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary of the full training step.")] = 10_000,
    repeats: Annotated[int, typer.Option(help="Timed repeats of each candidate (median reported).")] = 7,
    warmup: Annotated[int, typer.Option(help="Untimed repeats first.")] = 2,
    step: Annotated[bool, typer.Option(help="Also time the full training step against one on PyTorch's own LSTM module.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    generate: Annotated[bool, typer.Option("--generate", help="Time sampling instead: tokens/s per weight precision and stream count, and evaluation against the training forward.")] = False,
    run: Annotated[Optional[Path], typer.Option(help="With --generate: time this trained model (instead of a random one of --layers x the largest of --sizes, --vocab-size) and report the test perplexity of each precision.")] = None,
    precisions: Annotated[str, typer.Option(help="With --generate: weight precisions, comma-separated, or 'all' this CPU offers.")] = "all",
    streams: Annotated[str, typer.Option(help="With --generate: stream counts, comma-separated.")] = "1,32",
    tokens: Annotated[int, typer.Option(help="With --generate: tokens drawn per stream per timed repeat.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per measurement, one per line.")] = False,
    loop: Annotated[bool, typer.Option("--loop", help="Time lmtrain train's whole loop against a plain loop written as the PyTorch example writes its own, at the example's configuration (lmtrain.tools.bench_loop); --repeats rounds, --dtypes for ours.")] = False,
    corpus: Annotated[Optional[Path], typer.Option(help="With --loop: the corpus (a directory with train/valid/test.txt); default a generated one with the example's 10,000-word vocabulary.")] = None,
    steps: Annotated[int, typer.Option(help="With --loop: timed training steps per round.")] = 500,
    warmup_steps: Annotated[int, typer.Option(help="With --loop: untimed training steps first in each round.")] = 100,
    preset: Annotated[Optional[str], typer.Option(help="A named set of settings instead of --cells, --sizes, --layers, --batch-size and --bptt: issue7 (the LSTM at 2 x 650 and 2 x 1500, batch 20, bptt 35, and 1 x 512, batch 64, bptt 100).")] = None,
) -> None:
    """Training throughput and peak memory of our cells against PyTorch's own modules, interleaved (--generate: sampling)."""
    from lmtrain.tools import bench as benchmarks
    from lmtrain.model import CELLS

    if loop:
        return bench_loop(corpus, dtypes, steps, warmup_steps, repeats, as_json)
    if generate:
        return bench_generate(run, sizes, layers, vocab_size, batch_size, bptt, precisions, streams, tokens, repeats, warmup, as_json)
    with user_errors():
        names = list(CELLS) if cells == "all" else [c.strip() for c in cells.split(",")]
        unknown = [c for c in names if c not in CELLS]
        if unknown:
            raise LmtrainError(f"--cells: unknown cell '{unknown[0]}' (known: {', '.join(CELLS)})")
        try:
            size_list = [int(s) for s in sizes.split(",")]
        except ValueError:
            raise LmtrainError(f"--sizes must be comma-separated integers, got '{sizes}'") from None
        dtype_list = [d.strip() for d in dtypes.split(",")]
        if preset is not None and preset not in benchmarks.PRESETS:
            raise LmtrainError(f"--preset: unknown preset '{preset}' (known: {', '.join(benchmarks.PRESETS)})")
        if any(d not in benchmarks.DTYPES for d in dtype_list):
            raise LmtrainError(f"--dtypes must be fp32 and/or bf16, got '{dtypes}'")
        if min([layers, batch_size, bptt, vocab_size, repeats, *size_list]) < 1 or warmup < 0:
            raise LmtrainError("--layers, --batch-size, --bptt, --vocab-size, --repeats and --sizes must be positive")
        if repeats < 5:
            say(f"note: {repeats} repeats; medians of fewer than 5 are easily swayed on a shared machine")
        dev = resolve_device(device)
        if preset is None:
            settings = [benchmarks.Setting(layers, hidden, batch_size, bptt) for hidden in size_list]
        else:
            names, settings = ["lstm"], list(benchmarks.PRESETS[preset])
        records = []
        for s in settings:
            records += benchmarks.bench_stacks(names, [s.hidden_size], dtype_list, layers=s.layers, batch=s.batch_size,
                                               bptt=s.bptt, repeats=repeats, warmup=warmup, device=dev)
            if step:
                records += benchmarks.bench_train_steps([s.hidden_size], dtype_list, layers=s.layers, batch=s.batch_size,
                                                        bptt=s.bptt, vocab=vocab_size, repeats=repeats, warmup=warmup,
                                                        device=dev, note=say)
        if as_json:
            for record in benchmarks.as_dicts(records):
                typer.echo(json.dumps(record))
        else:
            typer.echo(f"device {dev} | torch {torch.__version__} | {torch.get_num_threads()} threads | median of {repeats}")
            typer.echo(benchmarks.format_table(records))


def bench_loop(corpus: Path | None, dtypes: str, steps: int, warmup_steps: int, repeats: int, as_json: bool) -> None:
    """`lmtrain bench --loop`: lmtrain train's loop against the PyTorch example's, interleaved."""
    from lmtrain.tools import bench_loop as loops

    with user_errors():
        precisions = [d.strip() for d in dtypes.split(",")]
        require(
            (all(p in ("fp32", "bf16") for p in precisions), f"--dtypes must be fp32 and/or bf16, got '{dtypes}'"),
            (steps >= 1 and warmup_steps >= 1 and repeats >= 1, "--steps, --warmup-steps and --repeats must be positive"),
            (corpus is None or corpus.is_dir(), f"--corpus must be a directory with train.txt, valid.txt and test.txt: {corpus}"),
        )
        records = loops.bench_loop(corpus, precisions, steps=steps, warmup=warmup_steps, rounds=repeats, say=say)
    if as_json:
        for record in records:
            typer.echo(json.dumps(dataclasses.asdict(record)))
    else:
        typer.echo(f"torch {torch.__version__} | {torch.get_num_threads()} threads | median of {repeats} rounds, "
                   f"{steps} steps after {warmup_steps}")
        typer.echo(loops.format_loop_table(records))


def bench_generate(run: Path | None, sizes: str, layers: int, vocab_size: int, batch_size: int, bptt: int,
                   precisions: str, streams: str, tokens: int, repeats: int, warmup: int, as_json: bool) -> None:
    """`lmtrain bench --generate`: sampling speed per precision, evaluation against the training forward."""
    from lmtrain.generation import WEIGHT_PRECISIONS, available_precisions
    from lmtrain.tools import GenerationBench, format_generation_table, measure_generation

    with user_errors():
        have = available_precisions(torch.device("cpu"))
        names = have if precisions == "all" else [p.strip() for p in precisions.split(",")]
        unknown = [p for p in names if p not in WEIGHT_PRECISIONS]
        require(
            (not unknown, f"--precisions: unknown precision '{unknown[0] if unknown else ''}' (known: {', '.join(WEIGHT_PRECISIONS)})"),
            (all(p in have for p in names), f"--precisions: this CPU offers {', '.join(have)}, not {precisions}"),
            (min(tokens, repeats, layers, batch_size, bptt, vocab_size) >= 1 and warmup >= 0,
             "--tokens, --repeats, --layers, --batch-size, --bptt and --vocab-size must be positive"),
        )
        try:
            stream_counts = [int(n) for n in streams.split(",")]
            hidden = max(int(s) for s in sizes.split(","))
        except ValueError:
            raise LmtrainError(f"--streams and --sizes must be comma-separated integers, got '{streams}' and '{sizes}'") from None
        require((min(stream_counts) >= 1 and hidden >= 1, "--streams and --sizes must be positive"))
        bench = GenerationBench(names, stream_counts, tokens, repeats, warmup, batch_size, bptt, run=run, layers=layers,
                                hidden=hidden, vocab_size=vocab_size)
        label, records = measure_generation(bench, say)
        if as_json:
            for record in records:
                typer.echo(json.dumps(dataclasses.asdict(record)))
        else:
            typer.echo(f"{label} | torch {torch.__version__} | {torch.get_num_threads()} threads | median of {repeats}")
            typer.echo(format_generation_table(records))
