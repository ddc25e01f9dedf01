"""The command line: parse, resolve the config, call one function. The only place that exits.

Precedence of settings: the dataclass defaults (lmtrain/config.py) < the TOML file given with
--config < each --set section.key=value, in order. Problems with the user's input print one line,
`error: ...`, on stderr and exit with code 2.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

try:
    from click import get_current_context
except ImportError:  # typer from 0.2x on carries its own copy of click
    from typer._click.globals import get_current_context

from lmtrain.checkpoint import CheckpointWriteError
from lmtrain.config import load_config
from lmtrain.errors import LmtrainError, one_line, require
from lmtrain.evaluation import (
    CacheSettings,
    DynamicEval,
    DynamicSettings,
    combine,
    evaluate as evaluate_tokens,
    evaluate_stream,
    gradient_stats,
    tune_cache as tune_cache_settings,
)
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
from lmtrain.memory import require_fits
from lmtrain.model import load_run
from lmtrain.progress import QuietProgress, TerminalProgress
from lmtrain.runtime import resolve_device
from lmtrain.text import BUILTIN, ENCODING_ERRORS, EOS_ID, Text, copy_stream, encode_split, load_corpus, load_text
from lmtrain.tools import (
    DEFAULT_ALPHABET,
    DEFAULT_K,
    memoryless_perplexity,
    optimum_perplexity,
    write_copy_corpus,
)
from lmtrain.training import InterruptSignals, StopSignals, distributed, prepare_run, resume_run, train as train_model

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Train, evaluate and sample next-word LSTM language models.",
)


@contextmanager
def user_errors():
    """Turn LmtrainError into one line on stderr and exit code 2; refuse float options that are
    not finite first (`finite_options`)."""
    try:
        finite_options()
        yield
    except LmtrainError as e:
        if not isinstance(e, distributed.ReportedByMainRank):  # under torchrun: the main rank says it once
            typer.echo(f"error: {one_line(e)}", err=True)
        raise typer.Exit(2) from None
    except OSError as e:  # an environment problem no check foresaw (a full disk, permissions): still one line
        where = f" ({e.filename})" if e.filename else ""
        typer.echo(f"error: {one_line(f'{e.strerror or e}{where}')}", err=True)
        raise typer.Exit(2) from None


def finite_options() -> None:
    """Every float option of the command being run must be a finite number: `inf` and `nan` parse
    as floats, and no option means either (checked here, so no command can forget it)."""
    ctx = get_current_context(silent=True)
    if ctx is None:
        return
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise LmtrainError(f"{param.opts[0]} must be a finite number, got {item}")


def say(message: str) -> None:
    typer.echo(message, err=True)


def quiet(message: str) -> None:
    pass


@app.command()
def train(
    ctx: typer.Context,
    corpus: Annotated[Optional[Path], typer.Argument(help="Directory with train.txt/valid.txt/test.txt, or one text file. Default: the built-in corpus.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (see configs/).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-o", help="Where to write the run. Default: runs/<corpus>-<time>.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run directory exactly where its last checkpoint left it, on its own corpus and config; --set may change only train.max_steps, train.epochs and train.max_minutes.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run: remove the files lmtrain wrote in it (anything else stays). Refused for the current or home directory, one holding the corpus or the cache, and a directory that is not an lmtrain run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", hidden=True, help="The old name of --force.")] = False,
    encoding_errors: Annotated[str, typer.Option(help="Bytes that are not UTF-8: strict (stop with an error) or replace (with U+FFFD).")] = "strict",
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Train with N processes on this machine (starts torchrun; train.batch_size is shared out).", show_default=False)] = None,
) -> None:
    """Train a tokenizer and a language model on CORPUS, or continue a run (--resume RUN).

    SIGINT (Ctrl-C) or SIGTERM: the current step ends, last.pt is written, and the command exits
    with 130 or 143; a second one stops at once, the last checkpoint intact.
    """
    with user_errors(), distributed.session(), ExitStack() as hold:  # `hold`: the run directory's lock
        require(
            (resume is None or (corpus is None and config is None), "--resume continues RUN on its own corpus and config: drop CORPUS and --config"),
            (resume is None or run_dir is None, "--resume RUN is the run directory: drop --run-dir"),
            (resume is None or not (force or overwrite), "--resume continues a run and --force replaces it: give one of them"),
            (resume is None or (nproc is None and not distributed.launched()), "--resume continues a run in one process: drop --nproc"),
        )
        check_encoding_errors(encoding_errors)
        cfg = load_config(config, overrides or []) if resume is None else None
        if nproc is not None:
            raise typer.Exit(distributed.launch(nproc, forwarded_args(ctx, drop="nproc"),
                                                resolve_device(cfg.train.device), cfg.train.batch_size))
        if resume is None:
            distributed.setup(resolve_device(cfg.train.device), cfg.train.batch_size)  # joins torchrun's ranks, if any
        progress = TerminalProgress() if distributed.is_main() else QuietProgress()
        early = InterruptSignals().install()  # until training starts, SIGTERM interrupts as SIGINT does
        try:
            if resume is not None:
                model, cfg, data, info, payload = resume_run(resume, overrides or [], say, encoding_errors, hold)
                run_dir = resume
            else:
                with distributed.main_first():  # caches and run dir: rank 0, then one rank per other machine, then the rest
                    model, data, info = prepare_run(corpus, cfg, run_dir, force or overwrite, default_run_dir,
                                                    say if distributed.is_main() else quiet, encoding_errors, progress,
                                                    hold)
                counts = str([len(split.tokens) for split in data.values()]).encode()
                distributed.check_same("tokenizers or token files", info["tokenizer"]["model"] + counts)
                run_dir, payload = Path(info.pop("run_dir")), None
        except KeyboardInterrupt:
            say(f"\n{early.name()}: interrupted before training started")
            raise typer.Exit(early.exit_code()) from None
        finally:
            early.restore()
        tell = say if distributed.is_main() else quiet
        with StopSignals() as signals:
            try:
                record = train_model(model, cfg, data, run_dir, info, progress, resume=payload,
                                     stop_requested=signals.received)
            except KeyboardInterrupt:  # a second signal
                tell(f"\naborted; {resume_hint(run_dir)}")
                raise typer.Exit(signals.exit_code()) from None
            except CheckpointWriteError as e:
                raise LmtrainError(f"{e}; once it can be written, resume with `lmtrain train --resume {run_dir}`") from None
        if record.get("kind") == "interrupted":
            tell(f"\n{signals.name()}: stopped after step {record['step']:,} (epoch {record['epoch']}); {resume_hint(run_dir)}")
            raise typer.Exit(signals.exit_code())
        ended = " (train.max_steps, mid-epoch)" if record.get("kind") == "stop" else ""
        tell(f"done: valid ppl {record['valid_ppl']:.2f} after {record['epoch']} epoch(s), {record['step']:,} steps{ended}; run in {run_dir}")
        tell(f"next: lmtrain evaluate {run_dir}   |   lmtrain generate {run_dir}")


def forwarded_args(ctx: typer.Context, drop: str) -> list[str]:
    """The command line of this command as parsed, without the parameter named `drop`."""
    arguments, options = [], []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == drop or value is None or value == () or value == [] or value == param.default:
            continue  # what is not given, or given as its default, the ranks take as their default
        if param.param_type_name == "argument":
            arguments.append(str(value))
        elif param.is_flag:
            if value != param.default:
                options.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for item in value if param.multiple else [value]:
                options += [param.opts[0], str(item)]
    return [*arguments, *options]


def resume_hint(run_dir: Path) -> str:
    if not (run_dir / "last.pt").is_file():
        return f"no checkpoint was written yet; start again with `lmtrain train ... --run-dir {run_dir} --force`"
    return f"{run_dir / 'last.pt'} holds the last checkpoint; continue with: lmtrain train --resume {run_dir}"


def check_encoding_errors(value: str) -> None:
    if value not in ENCODING_ERRORS:
        raise LmtrainError(f"--encoding-errors must be {' or '.join(ENCODING_ERRORS)}, got '{value}'")


def default_run_dir(source: str) -> Path:
    name = "builtin" if source == BUILTIN else Path(source).stem or "corpus"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory (its best.pt) or a checkpoint file.")],
    files: Annotated[Optional[list[Path]], typer.Argument(help="Text files to score instead of a split of the training corpus.", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Split of the training corpus: train, valid or test.")] = "test",
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams (default: the run's train.eval_batch_size). 1 gives every token its full left context.")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic evaluation (Krause et al. 2018): a gradient step after each scored window. One stream.")] = False,
    dynamic_lr: Annotated[float, typer.Option(help="Dynamic evaluation's learning rate.")] = DynamicSettings.lr,
    dynamic_decay: Annotated[float, typer.Option(help="Dynamic evaluation's pull back to the trained weights.")] = DynamicSettings.decay,
    dynamic_bptt: Annotated[int, typer.Option(help="Tokens per window between dynamic updates.")] = DynamicSettings.bptt,
    stats_batches: Annotated[int, typer.Option(help="Training batches (100 streams x the window) for dynamic evaluation's gradient statistics; 0: the whole split.")] = 0,
    cache: Annotated[bool, typer.Option("--cache", help="The continuous cache pointer (Grave et al. 2017). One stream.")] = False,
    cache_window: Annotated[int, typer.Option(help="Previous positions the cache looks at.")] = CacheSettings.window,
    cache_theta: Annotated[float, typer.Option(help="The cache's inverse temperature.")] = CacheSettings.theta,
    cache_lambda: Annotated[float, typer.Option(help="The cache's weight in the mixture.")] = CacheSettings.lam,
    tune_cache: Annotated[bool, typer.Option("--tune-cache", help="Choose --cache-theta and --cache-lambda on the validation split (a small grid).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    encoding_errors: Annotated[str, typer.Option(help="Bytes of FILES (or of the run's corpus) that are not UTF-8: strict (stop with an error) or replace (with U+FFFD).")] = "strict",
) -> None:
    """Perplexity, word-level perplexity and bits per byte of a trained model.

    FILES may be pipes (`/dev/stdin`, `<(...)`, a FIFO): they are read once, into a temporary file.
    """
    with user_errors(), ExitStack() as copies:
        check_encoding_errors(encoding_errors)
        if split not in ("train", "valid", "test"):
            raise LmtrainError(f"--split must be train, valid or test, got '{split}'")
        if batch_size is not None and batch_size < 1:
            raise LmtrainError(f"--batch-size must be at least 1, got {batch_size}")
        cache = cache or tune_cache
        stream = dynamic or cache
        require(
            (not (stream and batch_size not in (None, 1)), f"--dynamic and --cache score one stream: --batch-size must be 1, got {batch_size}"),
            (dynamic_lr > 0 and dynamic_decay >= 0 and dynamic_bptt >= 1 and stats_batches >= 0,
             "--dynamic-lr must be positive, --dynamic-decay and --stats-batches not negative, --dynamic-bptt at least 1"),
            (cache_window >= 1 and cache_theta > 0 and 0 <= cache_lambda <= 1,
             "--cache-window must be at least 1, --cache-theta positive and --cache-lambda in [0, 1]"),
        )
        loaded = load_run(run, resolve_device("auto"), say)
        batch = batch_size or loaded.config.train.eval_batch_size
        bptt = loaded.config.train.bptt
        if not stream:
            require_fits(batch * evaluation_stream_bytes(loaded.model, bptt), f"scoring {batch:,} streams at once (--batch-size)",
                         "give a smaller --batch-size", loaded.model.decoder.weight.device)
        if files:
            texts = {str(f): load_text_file(f, encoding_errors, copies) for f in files}
        else:
            texts = {split: corpus_split(loaded.corpus, split, encoding_errors, loaded.corpus_digests)}
        settings = {}
        adapt = None
        if dynamic:
            dyn = DynamicSettings(dynamic_lr, dynamic_decay, bptt=dynamic_bptt, stats_batches=stats_batches)
            train_tokens = encode_split(loaded.tokenizer, corpus_split(loaded.corpus, "train", encoding_errors, loaded.corpus_digests)).tokens
            adapt = DynamicEval(loaded.model, gradient_stats(loaded.model, train_tokens, dyn), dyn)
            bptt = dynamic_bptt
            settings["dynamic"] = dataclasses.asdict(dyn)
        cache_settings = CacheSettings(cache_window, cache_theta, cache_lambda) if cache else None
        if tune_cache:
            valid = encode_split(loaded.tokenizer, corpus_split(loaded.corpus, "valid", encoding_errors, loaded.corpus_digests))
            cache_settings = tune_cache_settings(loaded.model, valid, bptt, cache_window)
        if cache_settings is not None:
            settings["cache"] = dataclasses.asdict(cache_settings)
        results = {}
        for name, text in texts.items():
            tokens = encode_split(loaded.tokenizer, text)
            if len(tokens.tokens) == 0:  # the corpus checks refuse an empty text; this is the last guard
                raise LmtrainError(f"{name} holds no text to score")
            if batch_size is not None and batch_size > len(tokens.tokens):
                raise LmtrainError(f"--batch-size {batch_size:,} is more than the {len(tokens.tokens):,} tokens of {name}: "
                                   f"streams would hold no text; give at most {len(tokens.tokens):,}")
            if stream:
                results[name] = evaluate_stream(loaded.model, tokens, bptt, adapt, cache_settings)
            else:
                results[name] = evaluate_tokens(loaded.model, tokens, batch, bptt)
        report = dict(combine(list(results.values())))
        report.update(settings)
        if files:
            report["files"] = [{"file": name, **m} for name, m in results.items()]
        else:
            report["split"] = split
        if as_json:
            typer.echo(json.dumps(report))
            return
        for key, value in settings.items():
            typer.echo(f"{key}: " + ", ".join(f"{k} {v:g}" for k, v in value.items()))
        for name, m in results.items():
            typer.echo(format_metrics(name, m))
        if len(results) > 1:
            typer.echo(format_metrics("all", report))


def load_text_file(path: Path, encoding_errors: str, copies: ExitStack) -> Text:
    """A file to evaluate, checked. One that can be read only once (a pipe, a FIFO, /dev/stdin,
    `<(...)`) is first copied into a temporary file, which `copies` removes; messages name `path`."""
    if not path.exists():
        raise LmtrainError(f"file to evaluate not found: {path}")
    if path.is_file() or path.is_dir():
        return load_text(path, encoding_errors)
    copy = copies.enter_context(tempfile.NamedTemporaryFile(prefix="lmtrain-", suffix=".txt"))
    copy_stream(path, copy)
    try:
        text = load_text(Path(copy.name), encoding_errors)
    except LmtrainError as e:
        raise LmtrainError(str(e).replace(copy.name, str(path))) from None
    return dataclasses.replace(text, name=str(path))


def evaluation_stream_bytes(model, bptt: int) -> int:
    """A rough upper bound of one evaluation stream's memory: a window's logits and their
    log-softmax, the layers' activations and gates, the state."""
    hidden = sum(layer.hidden_size for layer in model.layers)
    return 4 * bptt * (3 * model.vocab_size + 8 * hidden) + 4 * 4 * hidden


def corpus_split(source: str, split: str, encoding_errors: str = "strict", recorded: dict[str, str] | None = None) -> Text:
    """A split of the run's training corpus; with `recorded` (the checkpoint's corpus_digests), a
    warning when its text is not the one the model was trained with (still scored)."""
    if source != BUILTIN and not Path(source).exists():
        raise LmtrainError(f"the run's training corpus {source} is no longer there; pass text files to score instead")
    text = load_corpus(None if source == BUILTIN else Path(source), encoding_errors).splits[split]
    if recorded is not None and recorded.get(split, text.digest) != text.digest:
        say(f"warning: the {split} split of {source} is not the text this model was trained with: the corpus has "
            "changed since (a one-file corpus that grew moves its splits onto other lines); scoring it anyway")
    return text


def format_metrics(name: str, m: dict) -> str:
    return (
        f"{name}: {m['tokens']:,} tokens | ppl {m['ppl']:.2f} | word ppl {m['word_ppl']:.2f} "
        f"({m['words']:,} words) | {m['bits_per_byte']:.3f} bits/byte"
        + (f" | {m['bits_per_char']:.3f} bits/char" if m["bits_per_char"] is not None else "")
    )


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


@contextmanager
def quiet_broken_pipe():
    """A reader that stops early (`lmtrain generate ... | head`) ends the command quietly, with
    the exit code of a process ended by SIGPIPE, as other tools in a pipe do."""
    try:
        yield
    except BrokenPipeError:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        except (OSError, ValueError):
            pass
        raise typer.Exit(141) from None


@app.command()
def bench(
    cells: Annotated[str, typer.Option(help="Our cells to time, comma-separated, or 'all'.")] = "all",
    sizes: Annotated[str, typer.Option(help="Hidden sizes (= input sizes), comma-separated.")] = "200,650",
    dtypes: Annotated[str, typer.Option(help="fp32, bf16 (mixed precision: ours with train.precision = bf16, PyTorch's LSTM module under torch.autocast) or both, comma-separated.")] = "fp32,bf16",
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
    preset: Annotated[Optional[str], typer.Option(help="A named set of settings instead of --cells, --sizes, --layers, --batch-size and --bptt: issue7 (the LSTM at 2 x 650 and 2 x 1500, batch 20, bptt 35, and 1 x 512, batch 64, bptt 100).")] = None,
) -> None:
    """Training throughput and peak memory of our cells against PyTorch's own LSTM module, interleaved (--generate: sampling)."""
    from lmtrain.tools import bench as benchmarks
    from lmtrain.model import CELLS

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
            records += benchmarks.bench_stacks(names, [s.hidden_size], dtype_list, s.layers, s.batch_size, s.bptt,
                                               repeats, warmup, dev)
            if step:
                records += benchmarks.bench_train_steps([s.hidden_size], dtype_list, s.layers, s.batch_size, s.bptt,
                                                        vocab_size, repeats, warmup, dev, say)
        if as_json:
            for record in benchmarks.as_dicts(records):
                typer.echo(json.dumps(record))
        else:
            typer.echo(f"device {dev} | torch {torch.__version__} | {torch.get_num_threads()} threads | median of {repeats}")
            typer.echo(benchmarks.format_table(records))


def bench_generate(run: Path | None, sizes: str, layers: int, vocab_size: int, batch_size: int, bptt: int,
                   precisions: str, streams: str, tokens: int, repeats: int, warmup: int, as_json: bool) -> None:
    """`lmtrain bench --generate`: sampling speed per precision, evaluation against the training forward."""
    from lmtrain.tools import bench as benchmarks
    from lmtrain.config import ModelConfig
    from lmtrain.model import LanguageModel
    from lmtrain.generation import PRECISIONS, available_precisions

    with user_errors():
        have = available_precisions(torch.device("cpu"))
        names = have if precisions == "all" else [p.strip() for p in precisions.split(",")]
        unknown = [p for p in names if p not in PRECISIONS]
        require(
            (not unknown, f"--precisions: unknown precision '{unknown[0] if unknown else ''}' (known: {', '.join(PRECISIONS)})"),
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
        test_tokens = None
        if run is not None:
            loaded = load_run(run, torch.device("cpu"))
            model, label = loaded.model, f"run {run}"
            if loaded.corpus != BUILTIN and not Path(loaded.corpus).exists():
                say(f"note: the run's corpus {loaded.corpus} is gone; no test perplexity")
            else:
                test_tokens = encode_split(loaded.tokenizer, load_corpus(None if loaded.corpus == BUILTIN else Path(loaded.corpus)).splits["test"]).tokens
        else:
            torch.manual_seed(0)
            model = LanguageModel(ModelConfig(layers=layers, embedding_size=hidden, hidden_size=hidden), vocab_size).eval()
            label = f"random {layers} x {hidden}, vocabulary {vocab_size:,}"
        records = benchmarks.bench_generation(model, names, stream_counts, tokens, repeats, warmup)
        if test_tokens is not None:
            ppl = {p: benchmarks.stepped_perplexity(model, test_tokens, p) for p in names}
            records = [dataclasses.replace(r, test_ppl=ppl[r.precision]) for r in records]
        records += benchmarks.bench_evaluation(model, batch_size, bptt, 10, repeats, warmup)
        if as_json:
            for record in records:
                typer.echo(json.dumps(dataclasses.asdict(record)))
        else:
            typer.echo(f"{label} | torch {torch.__version__} | {torch.get_num_threads()} threads | median of {repeats}")
            typer.echo(benchmarks.format_generation_table(records))


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write train.txt, valid.txt and test.txt to.")],
    k: Annotated[int, typer.Option("--k", help="Random symbols per line, repeated after the separator.")] = DEFAULT_K,
    alphabet: Annotated[int, typer.Option(help="Distinct symbols (s0, s1, ...).")] = DEFAULT_ALPHABET,
    lines: Annotated[int, typer.Option(help="Training lines; valid and test get 5 % as many each.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same files.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Overwrite train.txt, valid.txt and test.txt already in OUT_DIR.")] = False,
) -> None:
    """Write the copy task: a synthetic corpus whose best possible perplexity is known (lmtrain/tools/synth.py)."""
    with user_errors():
        require(
            (k >= 1, f"--k must be at least 1, got {k}"),
            (alphabet >= 2, f"--alphabet must be at least 2, got {alphabet}"),
            (lines >= 1, f"--lines must be at least 1, got {lines}"),
        )
        held_out = max(1, lines // 20)
        try:
            write_copy_corpus(out_dir, k, alphabet, lines, held_out, held_out, seed, force=force)
        except OSError as e:
            raise LmtrainError(f"cannot write the corpus to {out_dir}: {e.strerror}") from None
        typer.echo(
            f"{out_dir}: {lines:,} train, {held_out:,} valid, {held_out:,} test lines | K {k}, alphabet {alphabet} | "
            f"optimum ppl {optimum_perplexity(k, alphabet):.4f} (no memory: {memoryless_perplexity(k, alphabet):.4f})"
        )


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Also draw RUN/curves.png (needs matplotlib: pip install 'lmtrain[plot]').")] = True,
) -> None:
    """Write RUN/report.md (and RUN/curves.png): perplexities, learning rate and speed by epoch, the config."""
    from lmtrain.tools import write_report

    with user_errors():
        if not run.is_dir():
            raise LmtrainError(f"run directory not found: {run}")
        table, plotted = write_report(run, plot)
        typer.echo(table)
        typer.echo(f"wrote {run / 'report.md'}" + (f" and {run / 'curves.png'}" if plotted else ""))
        if plot and not plotted:
            say("note: no curves.png: matplotlib is not installed (pip install 'lmtrain[plot]')")


@app.command()
def reproduce(
    name: Annotated[str, typer.Argument(help="A published setup: a config name in configs/ (ptb-small, ptb-small-best, ptb-medium, ...).")],
    data: Annotated[Path, typer.Option(help="Directory holding ptb/ and wikitext-2/ (make data fills data/).")] = Path("data"),
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key of the config (recorded in the result).")] = None,
    config_dir: Annotated[Path, typer.Option(help="Where the configs are.")] = Path("configs"),
    runs_dir: Annotated[Path, typer.Option(help="The run goes to RUNS_DIR/reproduce-NAME.")] = Path("runs"),
    results_dir: Annotated[Path, typer.Option(help="The result goes to RESULTS_DIR/NAME.json.")] = Path("results"),
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier reproduction's run directory.")] = False,
) -> None:
    """Train a published setup, score valid and test as one stream each, write results/NAME.json."""
    from lmtrain.tools import reproduce as run_reproduction

    with user_errors():
        try:
            r = run_reproduction(name, data, config_dir, runs_dir, results_dir, overrides or [], TerminalProgress(), say, force)
        except KeyboardInterrupt:
            say(f"\ninterrupted; no result written to {results_dir / (name + '.json')}")
            raise typer.Exit(130) from None
        published = r["published"]
        typer.echo(
            f"{name}: valid {r['valid_ppl']:.2f} test {r['test_ppl']:.2f} (published {published['valid_ppl']} / "
            f"{published['test_ppl']}) | {r['train_minutes']:.1f} min of training on {r['device']} | "
            f"{results_dir / (name + '.json')}"
        )


@app.command()
def results(
    results_dir: Annotated[Path, typer.Option(help="Where `lmtrain reproduce` wrote its results.")] = Path("results"),
) -> None:
    """Print every reproduction result beside the published numbers, as one markdown table."""
    from lmtrain.tools import results_table

    with user_errors():
        typer.echo(results_table(results_dir))


def main() -> None:
    if not distributed.launched():
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    distributed.leave(code)


if __name__ == "__main__":
    main()
