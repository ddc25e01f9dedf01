"""`lmtrain generate`: samples from a saved run (lmtrain.generation), streamed as drawn."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmtrain.cli.app import app, check_encoding_errors, quiet_broken_pipe, say, user_errors
from lmtrain.errors import require
from lmtrain.generation import (
    Sampler,
    SampleSettings,
    StreamRandom,
    check_seed,
    draw_samples,
    draw_turn,
    resolve_precision,
    utf8_text,
    write_jsonl,
    write_text,
)
from lmtrain.model import load_run
from lmtrain.runtime import resolve_device
from lmtrain.text import EOS_ID


@app.command()
def generate(
    run: Annotated[Path, typer.Argument(help="Run directory (its best.pt) or a checkpoint file.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Tokens to sample per sample.")] = 100,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 is greedy.")] = 1.0,
    greedy: Annotated[bool, typer.Option("--greedy", help="Always the likeliest token (temperature 0).")] = False,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens only (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample from the smallest set of tokens whose probability reaches p.")] = 1.0,
    num_samples: Annotated[int, typer.Option(help="Independent samples, printed one after another, each as it is drawn (drawn in batches that fit in memory).")] = 1,
    until_eos: Annotated[bool, typer.Option("--until-eos", help="End each sample at its first end of line (<eos>).")] = False,
    stop: Annotated[str, typer.Option(help="End each sample where this text first appears (not included).")] = "",
    output_format: Annotated[str, typer.Option("--format", help="text, or jsonl: one JSON object per sample (a long sample in parts, see above).")] = "text",
    interactive: Annotated[bool, typer.Option("--interactive", help="Read lines from standard input; each continues the same story, the state kept between turns.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same text. Sample i uses seed + i, so it equals a single sample drawn with that seed. Every seed used must lie in [-2**63, 2**64 - 1].")] = None,
    precision: Annotated[str, typer.Option(help="Weights of the per-token products: fp32 (exact), bf16 or int8 (faster; docs/speed.md gives their perplexity), or auto: the fastest this CPU offers.")] = "auto",
    encoding_errors: Annotated[str, typer.Option(help="Bytes of --prompt or of standard input (--interactive) that are not UTF-8: strict (stop with an error) or replace (with U+FFFD).")] = "strict",
) -> None:
    """Sample text from a trained model, printing it as it is drawn.

    Samples come out in order, never interleaved, each printed token by token as it is drawn:
    text under `--- sample K` (with --num-samples above 1); jsonl as one record per sample,
    {"sample", "prompt", "text", "done": true}, where a sample longer than 65,536 characters
    comes as several records in a row, all but the last with "done": false (join their "text").
    Memory stays flat whatever --max-tokens and --num-samples (lmtrain/generation/samples.py).
    """
    with user_errors(), quiet_broken_pipe():
        require(
            (max_tokens >= 1, f"--max-tokens must be at least 1, got {max_tokens}"),
            (temperature >= 0, f"--temperature must not be negative, got {temperature}"),
            (top_k >= 0, f"--top-k must not be negative, got {top_k}"),
            (0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
            (num_samples >= 1, f"--num-samples must be at least 1, got {num_samples}"),
            (output_format in ("text", "jsonl"), f"--format must be text or jsonl, got '{output_format}'"),
            (not (interactive and num_samples > 1), "--interactive draws one stream: leave --num-samples at 1"),
        )
        check_encoding_errors(encoding_errors)
        prompt = utf8_text(prompt, "--prompt", encoding_errors)
        if seed is not None:
            check_seed(seed, num_samples)
        device = resolve_device("auto")
        precision = resolve_precision(precision, device)
        loaded = load_run(run, device, say)
        seed = seed if seed is not None else int.from_bytes(os.urandom(6), "little")
        stops = tuple(s for s in (stop, "\n" if until_eos else "") if s)
        settings = SampleSettings(max_tokens, num_samples, 0.0 if greedy else temperature, top_k, top_p, seed, precision, stops)
        if interactive:
            chat(Sampler(loaded.model, precision), loaded.tokenizer, settings, output_format, encoding_errors)
            return
        events = draw_samples(loaded.model, loaded.tokenizer, loaded.tokenizer.encode_prompt(prompt) if prompt else [], settings)
        if output_format == "jsonl":
            write_jsonl(events, prompt, sys.stdout)
        else:
            write_text(events, prompt, sys.stdout, headers=num_samples > 1)


def chat(sampler: Sampler, tokenizer, settings: SampleSettings, output_format: str, encoding_errors: str) -> None:
    """The --interactive loop: each input line is fed, then a continuation drawn; one story."""
    sampler.feed([EOS_ID])
    random = StreamRandom(settings.seed, 1)
    ask = sys.stdin.isatty()
    for number in itertools.count(1):
        if ask:
            sys.stderr.write("> ")
            sys.stderr.flush()
        raw = sys.stdin.buffer.readline()
        if not raw:
            return
        line = utf8_text(raw, f"line {number} of standard input", encoding_errors).rstrip("\n")
        sampler.feed(tokenizer.encode_prompt(line))
        events = draw_turn(sampler, tokenizer, settings, random)
        if output_format == "jsonl":
            write_jsonl(events, line, sys.stdout)
        else:
            write_text(events, "", sys.stdout, headers=False)
