"""Checks before the first training step: can the model and its windows fit in memory, and can
the encoded splits be trained on and validated?

Whatever can be known before training is checked before it, so that a run which cannot finish
stops with one line at once, not after its steps: a validation split that encoded to nothing
used to crash at the first validation, leaving no best.pt and a run that `--resume` could never
finish, and a model of 2^17 units asked for hundreds of GB while being built.

The memory figures are lower bounds (the weights, their gradients, the optimizer's state, the
logits of one window and what the recurrence keeps for the backward pass), compared with all the
memory there is: a run refused here could never have fitted, and one that passes may still be
too large once the rest (the allocator's slack, the token caches, other processes) is counted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from lmtrain.config import Config, ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model import attention, model_shapes, parameter_keys, stack
from lmtrain.text import TokenFile
from lmtrain.training.loop import min_train_tokens

FLOAT_BYTES = 4
GIB = 1 << 30


def parameter_count(model: ModelConfig, vocab_size: int) -> int:
    """The number of parameters of LanguageModel(model, vocab_size), from the config alone (the
    model's shapes, lmtrain.model.payload.model_shapes), so that nothing is built to know it."""
    shapes = model_shapes(model, vocab_size)
    return sum(math.prod(shapes[key]) for key in parameter_keys(model, shapes))


def memory_limit(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): the GPU's memory on CUDA, else this machine's (or its cgroup's limit)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            total = min(total, int(limit.read_text().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return total, "this machine"


def training_bytes(config: Config, vocab_size: int) -> int:
    """Lower bound of the memory one training step takes (see the module's docstring)."""
    m, t = config.model, config.train
    params = parameter_count(m, vocab_size)
    # weights and gradients; AdamW's two moments; NT-ASGD's average
    copies = 2 + {"adamw": 2, "ntasgd": 1}.get(t.optimizer, 0)
    positions = t.batch_size * t.bptt
    # per position: the embedding, each layer's gate activations, state and output, the attention's
    # band and h* (model.attention_window), and the logits with their softmax and gradient
    per_position = m.embedding_size + sum((cell.GATES + 2) * units for cell, _, units, _ in stack(m))
    if m.attention_window:
        per_position += attention.position_units(m.layer_sizes[-1], m.attention_window)
    return FLOAT_BYTES * (copies * params + positions * (per_position + 3 * vocab_size))


def validation_bytes(config: Config, vocab_size: int, valid_tokens: int) -> int:
    """Lower bound of the memory validation takes: the weights (twice under NT-ASGD, whose average
    is swapped in) and one window's logits and log-probabilities."""
    t = config.train
    steps = min(t.bptt, math.ceil(valid_tokens / t.eval_batch_size))
    copies = 2 if t.optimizer == "ntasgd" else 1
    return FLOAT_BYTES * (copies * parameter_count(config.model, vocab_size) + 2 * t.eval_batch_size * steps * vocab_size)


def check_model_fits(config: Config, vocab_size: int, device: torch.device, exact: bool = True) -> None:
    """Refuse, before anything is built, a model and training window larger than all the memory of
    `device`. `exact` False: `vocab_size` is a lower bound (before the tokenizer is trained)."""
    need, (have, where) = training_bytes(config, vocab_size), memory_limit(device)
    if need > have:
        t = config.train
        raise LmtrainError(
            f"the model ({'at least ' if not exact else ''}{parameter_count(config.model, vocab_size):,} parameters) "
            f"and one training window of train.batch_size {t.batch_size:,} x train.bptt {t.bptt:,} need at least "
            f"{need / GIB:,.1f} GiB, more than the {have / GIB:,.1f} GiB of {where}: lower model.hidden_size, "
            "model.embedding_size, model.layers, tokenizer.vocab_size, train.batch_size or train.bptt"
        )


def check_encoded(data: dict[str, TokenFile], config: Config, vocab_size: int, device: torch.device) -> None:
    """Refuse encoded splits that cannot be trained on (fewer tokens than one batch) or validated
    (no tokens, fewer than train.eval_batch_size streams, or a validation window too large for
    the memory of `device`)."""
    t = config.train
    n_train, needed = len(data["train"].tokens), min_train_tokens(t)
    if n_train < needed:
        raise LmtrainError(
            f"the training split has {n_train:,} tokens, too few for one batch of "
            f"train.batch_size {t.batch_size} x train.bptt {t.bptt} = {needed:,} tokens "
            "(use a larger corpus or lower train.batch_size / train.bptt)"
        )
    for split in ("valid", "test"):
        if len(data[split].tokens) == 0:
            raise LmtrainError(f"the {split} split encodes to no tokens: it holds no text to score")
    n_valid = len(data["valid"].tokens)
    if t.eval_batch_size > n_valid:
        raise LmtrainError(
            f"train.eval_batch_size {t.eval_batch_size:,} is more than the {n_valid:,} tokens of the validation split: "
            f"most of its streams would be empty (set train.eval_batch_size to {n_valid:,} or less, "
            "or use a larger validation split)"
        )
    need, (have, where) = validation_bytes(config, vocab_size, n_valid), memory_limit(device)
    if need > have:
        raise LmtrainError(
            f"validation with train.eval_batch_size {t.eval_batch_size:,} and a vocabulary of {vocab_size:,} needs at "
            f"least {need / GIB:,.1f} GiB, more than the {have / GIB:,.1f} GiB of {where}: lower "
            "train.eval_batch_size (or train.bptt, tokenizer.vocab_size)"
        )
