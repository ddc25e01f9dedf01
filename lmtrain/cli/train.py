"""`lmtrain train`: a corpus and a config -> a run (lmtrain.training), or `--resume RUN`."""

from __future__ import annotations

import datetime
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmtrain.checkpoint import CheckpointWriteError
from lmtrain.cli.app import app, check_encoding_errors, quiet, say, user_errors
from lmtrain.config import Config, given_keys, load_config, to_toml
from lmtrain.errors import LmtrainError, require
from lmtrain.progress import QuietProgress, TerminalProgress
from lmtrain.runtime import resolve_device
from lmtrain.training import (InterruptSignals, Plan, StopSignals, default_run_dir, distributed, finetune_config,
                              prepare_run, resume_run, train as train_model)


@app.command()
def train(
    ctx: typer.Context,
    corpus: Annotated[Optional[Path], typer.Argument(help="Directory with train.txt/valid.txt/test.txt, or one text file. Default: the built-in corpus.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (see configs/).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key: section.key=value (repeatable).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-o", help="Where to write the run. Default: runs/<corpus>-<time>.")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue this run directory exactly where its last checkpoint left it, on its own corpus and config; --set may change only train.max_steps, train.epochs and train.max_minutes.", show_default=False)] = None,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Fine-tune: start from this run's (or checkpoint's) weights, tokenizer and config, with a fresh optimizer and schedule, in a new run directory; CORPUS is encoded with its vocabulary. --config and --set may change any key but those that shape the model (training.SHAPE_KEYS).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run: remove the files lmtrain wrote in it (anything else stays). Refused for the current or home directory, one holding the corpus or the cache, and a directory that is not an lmtrain run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", hidden=True, help="The old name of --force.")] = False,
    encoding_errors: Annotated[str, typer.Option(help="Bytes that are not UTF-8: strict (stop with an error) or replace (with U+FFFD).")] = "strict",
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="Train with N processes on this machine (starts torchrun; train.batch_size is shared out).", show_default=False)] = None,
    minutes: Annotated[Optional[float], typer.Option("--minutes", "-m", help="Train for at most M minutes from now, setup and the C++ build included, then validate and checkpoint (train.max_minutes); with model.size = auto the model and the run's length are chosen to fill them.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and what the run would do (tokens/s measured here, steps, epochs, finish time), then stop: no run directory is written.")] = False,
) -> None:
    """Train a tokenizer and a language model on CORPUS, continue a run (--resume RUN), or
    fine-tune a trained run on CORPUS (--init-from RUN).

    SIGINT (Ctrl-C) or SIGTERM: the current step ends, last.pt is written, and the command exits
    with 130 or 143; a second one stops at once, the last checkpoint intact.
    """
    started = time.perf_counter()  # train.max_minutes counts from here
    with user_errors(), distributed.session(), ExitStack() as hold:  # `hold`: the run directory's lock
        overrides = [*(overrides or []), *minutes_override(minutes)]
        require(
            (not dry_run or (resume is None and nproc is None and not distributed.launched()), "--dry-run plans a new run in this process: drop --resume and --nproc"),
            (resume is None or (corpus is None and config is None), "--resume continues RUN on its own corpus and config: drop CORPUS and --config"),
            (resume is None or run_dir is None, "--resume RUN is the run directory: drop --run-dir"),
            (resume is None or not (force or overwrite), "--resume continues a run and --force replaces it: give one of them"),
            (resume is None or (nproc is None and not distributed.launched()), "--resume continues a run in one process: drop --nproc"),
            (resume is None or init_from is None, "--resume continues a run and --init-from starts a new one from it: give one of them"),
        )
        check_encoding_errors(encoding_errors)
        start = None
        if init_from is not None:
            cfg, saved = finetune_config(init_from, config, overrides, say)
            start = (init_from, saved)
        else:
            cfg = load_config(config, overrides) if resume is None else None
        if nproc is not None:
            raise typer.Exit(distributed.launch(nproc, forwarded_args(ctx, drop="nproc"),
                                                resolve_device(cfg.train.device), cfg.train.batch_size))
        if resume is None:
            distributed.setup(resolve_device(cfg.train.device), cfg.train.batch_size)  # joins torchrun's ranks, if any
        progress = TerminalProgress() if distributed.is_main() else QuietProgress()
        early = InterruptSignals().install()  # until training starts, SIGTERM interrupts as SIGINT does
        try:
            if resume is not None:
                model, cfg, data, info, payload = resume_run(resume, overrides, say, encoding_errors, hold)
                run_dir = resume
            else:
                with distributed.main_first():  # caches and run dir: rank 0, then one rank per other machine, then the rest
                    model, cfg, data, info = prepare_run(corpus, cfg, run_dir, force=force or overwrite,
                                                         default_run_dir=default_run_dir,
                                                         say=say if distributed.is_main() else quiet,
                                                         encoding_errors=encoding_errors, progress=progress, hold=hold,
                                                         init_from=start, given=given_keys(config, overrides),
                                                         started=started, dry_run=dry_run)
                if dry_run:
                    print_plan(cfg, info["plan"], started)
                    return
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
                record = train_model(model, cfg, data, run_dir, info, progress=progress, resume=payload,
                                     stop_requested=signals.received, started=started)
            except KeyboardInterrupt:  # a second signal
                tell(f"\naborted; {resume_hint(run_dir)}")
                raise typer.Exit(signals.exit_code()) from None
            except CheckpointWriteError as e:
                raise LmtrainError(f"{e}; once it can be written, resume with `lmtrain train --resume {run_dir}`") from None
        if record.get("kind") == "interrupted":
            tell(f"\n{signals.name()}: stopped after step {record['step']:,} (epoch {record['epoch']}); {resume_hint(run_dir)}")
            raise typer.Exit(signals.exit_code())
        ended = " (mid-epoch)" if record.get("kind") == "stop" else ""
        tell(f"done: valid ppl {record['valid_ppl']:.2f} after {record['epoch']} epoch(s), {record['step']:,} steps{ended}; run in {run_dir}")
        if cfg.train.max_minutes:
            tell(budget_note(cfg.train.max_minutes, record["run_s"]))
        tell(f"next: lmtrain evaluate {run_dir}   |   lmtrain generate {run_dir}")


def minutes_override(minutes: float | None) -> list[str]:
    """--minutes M as the override it stands for (train.max_minutes), checked as that key is."""
    if minutes is None:
        return []
    if not (minutes > 0 and math.isfinite(minutes)):
        raise LmtrainError(f"--minutes must be a positive number of minutes, got {minutes:g}")
    return [f"train.max_minutes={minutes!r}"]


def budget_note(minutes: float, elapsed_s: float) -> str:
    """How the run kept its time budget: within it, or past it by the final validation and checkpoint."""
    over = elapsed_s - 60 * minutes
    if over <= 0:
        return f"time: {elapsed_s / 60:.2f} min of the {minutes:g}-minute budget"
    return f"time: {elapsed_s / 60:.2f} min, {over:.1f} s past the {minutes:g}-minute budget (the final validation and checkpoint)"


def print_plan(config: Config, plan: Plan, started: float) -> None:
    """--dry-run's report: the resolved config as TOML (what config.toml would hold) and the plan
    (`started`: the command's time.perf_counter() at its start)."""
    typer.echo(to_toml(config))
    typer.echo(f"# tokens/s (probed here): {plan.tokens_per_s:,.0f}")
    typer.echo(f"# steps: {plan.steps:,} ({plan.epochs:.2f} epochs)")
    finish = datetime.datetime.now() + datetime.timedelta(seconds=plan.finish_s - (time.perf_counter() - started))
    typer.echo(f"# expected finish: {plan.finish_s / 60:.1f} min from the start, about {finish:%H:%M:%S}"
               + (f" (budget {config.train.max_minutes:g} min)" if config.train.max_minutes else ""))


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
