"""Run directories: what `train` writes and what `evaluate` and `generate` read back.

    RUN/
      config.toml       the resolved config (defaults < file < --set)
      tokenizer.model   the sentencepiece model trained on the training split
      metrics.jsonl     one JSON record per log interval and per epoch (losses, lr)
      timing.jsonl      tokens/s and elapsed seconds of the same records
      best.pt           checkpoint with the best validation loss so far
      last.pt           checkpoint after the latest epoch

Checkpoints are self-contained: each also holds the tokenizer, so a single .pt file can be
evaluated or sampled from on its own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmtrain.atomic import atomic_open
from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import Config, from_dict, to_toml
from lmtrain.corpus import load_corpus
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel, count_parameters
from lmtrain.prepare import encode_corpus, get_tokenizer
from lmtrain.tokenizer import Tokenizer
from lmtrain.tokens import TokenFile
from lmtrain.train import min_train_tokens, resolve_device, seed_everything

RUN_MARKER = "config.toml"


def prepare_run(corpus: Path | None, config: Config, run_dir: Path | None, overwrite: bool,
                default_run_dir, say, encoding_errors: str = "strict",
                progress=None) -> tuple[LanguageModel, dict[str, TokenFile], dict[str, Any]]:
    """Everything before the first training step: read and tokenize the corpus, check it is big
    enough, make the run directory and the seeded model on the configured device.

    `default_run_dir(source)` names the run directory when `run_dir` is None; `say` takes one
    line of news for the user. Returns the model, the encoded splits and what every checkpoint
    stores besides the model, with "run_dir" added (pop it before training: it is not stored).
    `encoding_errors` (lmtrain.corpus.ENCODING_ERRORS) applies to reading the corpus; `progress`
    (lmtrain.progress) shows the passes over it.
    """
    texts = load_corpus(corpus, encoding_errors)
    device = resolve_device(config.train.device)
    say(f"corpus: {texts.source} ({', '.join(f'{len(v):,} {k} lines' for k, v in texts.splits.items())})")
    tc = config.tokenizer
    tokenizer = get_tokenizer(texts.splits["train"], tc.kind, tc.vocab_size, tc.sample_lines, progress)
    data = encode_corpus(tokenizer, texts.splits, progress)
    n_train, needed = len(data["train"].tokens), min_train_tokens(config.train)
    if n_train < needed:
        raise LmtrainError(
            f"the training split has {n_train:,} tokens, too few for one batch of "
            f"train.batch_size {config.train.batch_size} x train.bptt {config.train.bptt} = {needed:,} tokens "
            "(use a larger corpus or lower train.batch_size / train.bptt)"
        )
    run_dir = run_dir or default_run_dir(texts.source)
    model, info = start_run(run_dir, config, tokenizer, texts.source, overwrite, device)
    say(
        f"tokens: {', '.join(f'{len(v.tokens):,} {k}' for k, v in data.items())} | "
        f"vocab {tokenizer.vocab_size:,} ({tc.kind}{vocab_note(tokenizer.vocab_size, tc.vocab_size)}) | "
        f"{count_parameters(model):,} parameters | "
        f"device {device} | run {run_dir}"
    )
    return model, data, {**info, "run_dir": str(run_dir)}


def vocab_note(got: int, asked: int) -> str:
    """Says so when the training text gave fewer pieces than tokenizer.vocab_size asked for."""
    return f"; the corpus gives no more than {got:,} of the {asked:,} asked for" if got < asked else ""


def start_run(run_dir: Path, config: Config, tokenizer: Tokenizer, corpus_source: str, overwrite: bool,
              device: torch.device) -> tuple[LanguageModel, dict[str, Any]]:
    """Make the run directory with its config and tokenizer, and build the seeded model on `device`.

    Returns the model and what every checkpoint of the run stores besides it (corpus, tokenizer).
    """
    create_run_dir(run_dir, overwrite)
    write_run_files(run_dir, config, tokenizer)
    seed_everything(config.train.seed)
    model = LanguageModel(config.model, tokenizer.vocab_size).to(device)
    return model, {"corpus": corpus_source, **tokenizer_info(tokenizer)}


def create_run_dir(path: Path, overwrite: bool) -> None:
    """Make an empty run directory; an existing run is replaced only with `overwrite`."""
    try:
        make_empty_dir(path, overwrite)
    except OSError as e:
        raise LmtrainError(f"cannot create run directory {path}: {e.strerror}") from None


def make_empty_dir(path: Path, overwrite: bool) -> None:
    if path.exists():
        if not path.is_dir():
            raise LmtrainError(f"run directory {path} exists and is not a directory")
        if any(path.iterdir()):
            if not overwrite:
                raise LmtrainError(f"run directory {path} already exists and is not empty (pass --overwrite to replace it)")
            if not (path / RUN_MARKER).is_file():
                raise LmtrainError(f"refusing to overwrite {path}: it is not an lmtrain run directory")
            shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def write_run_files(run_dir: Path, config: Config, tokenizer: Tokenizer) -> None:
    with atomic_open(run_dir / "tokenizer.model") as f:
        f.write(tokenizer.model_proto)
    with atomic_open(run_dir / RUN_MARKER) as f:
        f.write(to_toml(config).encode("utf-8"))


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint stores of the tokenizer."""
    return {"tokenizer": {"kind": tokenizer.kind, "model": tokenizer.model_proto}, "vocab_size": tokenizer.vocab_size}


@dataclass
class LoadedRun:
    model: LanguageModel
    tokenizer: Tokenizer
    config: Config
    corpus: str  # the training corpus' source: an absolute path or "builtin"
    progress: dict[str, Any]


def checkpoint_path(run: Path) -> Path:
    """RUN/best.pt for a run directory (last.pt if no best yet), or the file itself."""
    if not run.exists():
        raise LmtrainError(f"run not found: {run}")
    if run.is_dir():
        for name in ("best.pt", "last.pt"):
            if (run / name).is_file():
                return run / name
        raise LmtrainError(f"{run} holds no checkpoint (best.pt or last.pt)")
    return run


def load_run(run: Path, device: torch.device) -> LoadedRun:
    """Load a run directory or checkpoint file, the model on `device` in eval mode."""
    path = checkpoint_path(run)
    payload = load_checkpoint(path)
    try:
        config = from_dict(payload["config"])
        tokenizer = Tokenizer(payload["tokenizer"]["model"], payload["tokenizer"]["kind"])
        model = LanguageModel(config.model, payload["vocab_size"])
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise LmtrainError(f"{path}: checkpoint content does not match this version of lmtrain ({str(e).splitlines()[0][:160]})") from None
    model.to(device).eval()
    return LoadedRun(model, tokenizer, config, payload["corpus"], payload["progress"])
