"""Run directories: what `train` writes and what `evaluate`, `generate` and `train --resume` read back.

    RUN/
      .lmtrain-run      the marker that makes RUN an lmtrain run, written first (lmtrain.runs)
      .lock             held by the process training the run: one writer at a time (lmtrain.runs)
      config.toml       the resolved config (defaults < file < --set)
      tokenizer.model   the sentencepiece model trained on the training split
      metrics.jsonl     one JSON record per log interval and per epoch (losses, lr)
      timing.jsonl      tokens/s and elapsed seconds of the same records
      best.pt           checkpoint with the best validation loss so far
      last.pt           checkpoint of the latest epoch end or step (train.checkpoint_every):
                        everything `lmtrain train --resume RUN` needs to continue exactly
      best.prev.pt      the checkpoints each of those replaced, kept in case the newer one is
      last.prev.pt      damaged (lmtrain.checkpoint)
      report.md         `lmtrain report RUN` (lmtrain.tools.report), with curves.png

`--force` removes only these files (lmtrain.runs.clear): anything else in RUN is kept.

Checkpoints are self-contained: each also holds the tokenizer, so a single .pt file can be
evaluated or sampled from on its own.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from lmtrain import runs
from lmtrain.atomic import atomic_open
from lmtrain.config import Config, load_config, to_toml
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel, Saved, count_parameters
from lmtrain.runtime import resolve_device, seed_everything
from lmtrain.text import BUILTIN, Corpus, TokenFile, Tokenizer, cache_dir, encode_corpus, get_tokenizer, load_corpus
from lmtrain.training import autosize, distributed, tensorboard
from lmtrain.training.finetune import check_new_run_dir, origin, unknown_note, unknown_shares
from lmtrain.training.stops import finished, plan
from lmtrain.training.payload_resume import check_resume_data, check_resume_payload
from lmtrain.training.preflight import check_encoded, check_model_fits
from lmtrain.training.resume import (
    check_logs,
    check_resume_overrides,
    check_same_config,
    cut_logs,
    data_digest,
    load_resume_checkpoint,
    remove_partial_files,
    restore_best,
    set_aside_damaged,
)

CONFIG = "config.toml"


def prepare_run(corpus: Path | None, config: Config, run_dir: Path | None, *, force: bool,
                default_run_dir, say, encoding_errors: str = "strict",
                progress=None, hold: ExitStack | None = None,
                init_from: tuple[Path, Saved] | None = None, given: frozenset[str] | None = None,
                started: float | None = None,
                dry_run: bool = False) -> tuple[LanguageModel | None, Config, dict[str, TokenFile], dict[str, Any]]:
    """Everything before the first training step: read and tokenize the corpus, check it is big
    enough, make the config concrete (lmtrain.training.autosize: train.precision and, under a time
    budget, model.size = "auto"), make the run directory and the seeded model on the configured device.

    `default_run_dir(source)` names the run directory when `run_dir` is None; `say` takes one
    line of news for the user. Returns the model, the encoded splits and what every checkpoint
    stores besides the model, with "run_dir" added (pop it before training: it is not stored).
    `encoding_errors` (lmtrain.text.corpus.ENCODING_ERRORS) applies to reading the corpus; `progress`
    (lmtrain.progress) shows the passes over it. The run directory is locked until `hold` closes
    (see start_run). `init_from`: (RUN, RUN as read) to fine-tune (lmtrain.training.finetune): its
    tokenizer encodes the corpus and its weights replace the new model's.
    """
    if init_from is not None and run_dir is not None:  # a default run directory is a new one
        check_new_run_dir(run_dir, init_from[0])
    if config.train.tensorboard:
        tensorboard.writer_class()  # a missing package is one line before anything is read or written
    device = distributed.rank_device(resolve_device(config.train.device))  # cuda:LOCAL_RANK under torchrun
    tc = config.tokenizer
    # before reading the corpus; word and char vocabularies are at most tokenizer.vocab_size
    exact = tc.kind in ("bpe", "unigram") or init_from is not None
    check_model_fits(config, init_from[1].vocab_size if init_from else tc.vocab_size if exact else 3, device, exact)
    texts = load_corpus(corpus, encoding_errors)
    say(f"corpus: {texts.source} ({', '.join(f'{len(v):,} {k} lines' for k, v in texts.splits.items())})")
    if init_from is not None:
        tokenizer = init_from[1].tokenizer  # the vocabulary stays RUN's
    else:
        tokenizer = get_tokenizer(texts.splits["train"], tc.kind, tc.vocab_size, tc.sample_lines, progress)
    if init_from is None and tc.kind in ("bpe", "unigram") and tokenizer.vocab_size < tc.vocab_size:  # word and char: a cap (config.py)
        raise LmtrainError(f"config key 'tokenizer.vocab_size' = {tc.vocab_size:,} is more than this corpus allows: its "
                           f"training text gives a {tc.kind} vocabulary of {tokenizer.vocab_size:,} pieces at most "
                           f"(set tokenizer.vocab_size to {tokenizer.vocab_size:,} or less, or use a larger corpus)")
    data = encode_corpus(tokenizer, texts.splits, progress)
    if init_from is not None:
        shares = unknown_shares(data)
        say(unknown_note(shares, init_from[0]))
    check_encoded(data, config, tokenizer.vocab_size, device)  # it can train and validate
    config, plan = autosize.resolve(config, None if init_from is not None else given, vocab_size=tokenizer.vocab_size,
                                    data=data, device=device, started=time.perf_counter() if started is None else started,
                                    several_processes=distributed.world_size() > 1, probe_always=dry_run)
    if plan is not None:
        say(autosize.describe(plan, config))
    check_model_fits(config, tokenizer.vocab_size, device)
    if dry_run:
        return None, config, data, {"plan": plan}
    run_dir = run_dir or default_run_dir(texts.source)
    model, info = start_run(run_dir, config, tokenizer, corpus_source=texts.source, force=force, device=device, hold=hold)
    info["corpus_digests"] = corpus_digests(texts)
    if init_from is not None:
        model.load_state_dict(init_from[1].weights)  # exactly RUN's; the optimizer and schedule start afresh
        info["init_from"] = origin(*init_from, shares)
        if distributed.is_main():
            runs.write_marker(run_dir, info["init_from"])
    say(
        f"tokens: {', '.join(f'{len(v.tokens):,} {k}' for k, v in data.items())} | "
        f"vocab {tokenizer.vocab_size:,} ({tc.kind}{vocab_note(tokenizer.vocab_size, tc.vocab_size)}) | "
        f"{count_parameters(model):,} parameters{fixed_note(model)} | "
        f"device {device} | run {run_dir}"
    )
    return model, config, data, {**info, "run_dir": str(run_dir)}


def default_run_dir(source: str) -> Path:
    """runs/<corpus>-<time>: where a run goes when no run directory is given."""
    name = "builtin" if source == BUILTIN else Path(source).stem or "corpus"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def corpus_digests(texts: Corpus) -> dict[str, str]:
    """What a checkpoint stores of the text of each split (lmtrain.text.corpus' digests), so that
    `evaluate` can tell when the corpus changed since training."""
    return {split: text.digest for split, text in texts.splits.items()}


def vocab_note(got: int, asked: int) -> str:
    """Says so when the training text gave fewer pieces than tokenizer.vocab_size asked for."""
    return f"; the corpus gives no more than {got:,} of the {asked:,} asked for" if got < asked else ""


def start_run(run_dir: Path, config: Config, tokenizer: Tokenizer, *, corpus_source: str, force: bool,
              device: torch.device, hold: ExitStack | None = None) -> tuple[LanguageModel, dict[str, Any]]:
    """Make the run directory with its config and tokenizer, and build the seeded model on `device`.

    The run directory stays locked until `hold` closes (pass the ExitStack that outlives
    training; without one the lock is held only while the directory is made). Returns the model
    and what every checkpoint of the run stores besides it (corpus, tokenizer).
    """
    seed_everything(config.train.seed)
    model = build_model(config, tokenizer.vocab_size).to(device)  # before the run directory: it may not fit
    if distributed.is_main():  # under torchrun the other ranks write nothing
        with ExitStack() as local:
            keep = [cache_dir()] + ([] if corpus_source == BUILTIN else [Path(corpus_source)])
            runs.create(run_dir, force, keep, local if hold is None else hold)
            try:
                write_run_files(run_dir, config, tokenizer)
            except OSError as e:
                raise LmtrainError(f"cannot write to run directory {run_dir}: {e.strerror} (once it can be written, "
                                   f"start again with --force)") from None
    return model, {"corpus": corpus_source, **tokenizer_info(tokenizer)}


def build_model(config: Config, vocab_size: int) -> LanguageModel:
    try:
        return LanguageModel(config.model, vocab_size)
    except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise LmtrainError(f"cannot build the model ({first_line}): lower model.hidden_size, model.embedding_size, "
                           "model.layers or tokenizer.vocab_size") from None


def write_run_files(run_dir: Path, config: Config, tokenizer: Tokenizer) -> None:
    with atomic_open(run_dir / "tokenizer.model") as f:
        f.write(tokenizer.model_proto)
    with atomic_open(run_dir / CONFIG) as f:
        f.write(to_toml(config).encode("utf-8"))


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint stores of the tokenizer."""
    return {"tokenizer": {"kind": tokenizer.kind, "model": tokenizer.model_proto}, "vocab_size": tokenizer.vocab_size}


def resume_run(run_dir: Path, overrides: list[str], say, encoding_errors: str = "strict",
               hold: ExitStack | None = None) -> tuple[LanguageModel, Config, dict[str, TokenFile],
                                                                    dict[str, Any], dict[str, Any]]:
    """Everything before `train(..., resume=payload)` continues RUN where its last.pt left it.

    The config is RUN/config.toml with `overrides`, which may only change the stopping keys
    (lmtrain.config.RESUMABLE_KEYS); it must otherwise be the checkpoint's, and the corpus must
    give the same tokens. Every check comes before anything in RUN changes; then stray temporary
    files go, the logs are cut back to the checkpoint (lmtrain.training.resume), best.pt is made what it
    was at that step, and config.toml is rewritten with the overrides. Returns the model (the
    trained weights, on the configured device), the config, the encoded splits, what every
    checkpoint stores besides the model, and last.pt's payload for `train`. RUN is locked, from
    before the first check until `hold` closes (pass the ExitStack that outlives training; None:
    only checked to be free).
    """
    if not run_dir.is_dir():
        raise LmtrainError(f"run directory not found: {run_dir}")
    if not runs.is_run_dir(run_dir):
        raise LmtrainError(f"{run_dir} is not an lmtrain run directory (no {runs.MARKER}, nor a {CONFIG} "
                           "with metrics.jsonl or a checkpoint)")
    check_resume_overrides(overrides)
    check_writable(run_dir)
    runs.lock(run_dir, hold)
    runs.check_run_files(run_dir)
    path, payload = load_resume_checkpoint(run_dir, say)
    checked, loop = check_resume_payload(path, payload)  # every part of last.pt, before anything changes
    config = load_config(run_dir / CONFIG, overrides)
    check_same_config(config, payload["config"], run_dir / CONFIG, path)
    check_logs(run_dir, loop)
    source = payload["corpus"]
    if source != BUILTIN and not Path(source).exists():
        raise LmtrainError(f"the run's corpus {source} is no longer there: put it back to resume")
    texts = load_corpus(None if source == BUILTIN else Path(source), encoding_errors)
    tokenizer = checked.tokenizer
    data = encode_corpus(tokenizer, texts.splits)
    if data_digest(data) != payload["resume"]["data"]:
        raise LmtrainError(f"the corpus {source} has changed since {path} was written: a run resumes on the same text")
    check_resume_data(path, loop, config, len(data["train"].tokens))
    tc = config.train
    epochs, _ = plan(tc, len(data["train"].tokens) // tc.batch_size)
    reason = finished(tc, loop, epochs, loop.elapsed_s)
    if reason is not None:
        raise LmtrainError(f"{run_dir} has finished: {reason} (step {loop.step:,}); to train further, raise "
                           "train.epochs, train.max_steps or train.max_minutes with --set")
    device = resolve_device(tc.device)
    check_model_fits(config, payload["vocab_size"], device)
    check_encoded(data, config, payload["vocab_size"], device)  # a run started before these checks may fail them
    seed_everything(tc.seed)  # deterministic algorithms; the generators' states come from the checkpoint
    model = build_model(config, payload["vocab_size"])
    try:
        model.load_state_dict(payload["resume"]["trained"] or payload["model"])
    except RuntimeError as e:
        raise LmtrainError(f"{path}: the checkpoint's weights do not fit the model its config describes "
                           f"({str(e).strip().splitlines()[0][:160]})") from None
    model.to(device)
    try:  # the checks passed: now the run directory goes back to the checkpoint's moment
        if not runs.is_marked(run_dir):  # a run from before the marker
            runs.write_marker(run_dir)
        set_aside_damaged(run_dir, path, say)
        remove_partial_files(run_dir)
        restore_best(run_dir, loop.step, say)
        cut_logs(run_dir, loop)
        with atomic_open(run_dir / CONFIG) as f:
            f.write(to_toml(config).encode("utf-8"))
    except OSError as e:
        raise LmtrainError(f"cannot write to run directory {run_dir}: {e.strerror}") from None
    where = f"epoch {loop.epoch}, step {loop.step:,}" + ("" if loop.lengths is None else f" (window {loop.window} of {len(loop.lengths)})")
    say(f"resuming {run_dir} from {path.name}: {where} | device {device}")
    info = {"corpus": source, **tokenizer_info(tokenizer), "corpus_digests": corpus_digests(texts)}
    if "init_from" in payload:  # a fine-tuned run's checkpoints keep saying where it came from
        info["init_from"] = payload["init_from"]
    return model, config, data, info, payload


def check_writable(run_dir: Path) -> None:
    """Fail before changing anything when files cannot be created in `run_dir`."""
    try:
        probe = tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check.", suffix=".part")
        probe.close()
    except OSError as e:
        raise LmtrainError(f"cannot write to run directory {run_dir}: {e.strerror}") from None


def fixed_note(model: LanguageModel) -> str:
    """' (N trained)' when some parameters are fixed (model.reservoir), else ''."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f" ({trained:,} trained)" if trained != count_parameters(model) else ""
