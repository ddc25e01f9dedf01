"""Fine-tuning: `lmtrain train NEW_CORPUS --init-from RUN` starts a new run from RUN's weights.

    RUN (a run directory or checkpoint: lmtrain.model.read_saved) ─▶ config, weights, tokenizer
    config   RUN's config < --config FILE < --set: the keys that shape the model and its
             vocabulary (SHAPE_KEYS) must stay RUN's, any other may change (dropout, lr, epochs...)
    corpus   encoded with RUN's tokenizer, the vocabulary frozen; the share of <unk> is reported
    model    built as a new run's is (seeded), then RUN's weights copied in, exactly
    training a fresh optimizer and schedule (lmtrain.training.loop), step 0, a new run directory
             whose marker and checkpoints record where it came from ("init_from")

lmtrain.training.setup.prepare_run does the rest, as for any new run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmtrain.config import Config, load_config, to_dict
from lmtrain.errors import LmtrainError
from lmtrain.model import Saved, read_saved
from lmtrain.text import UNK_ID, TokenFile

# what the weights' shapes and the token ids depend on: these cannot change under RUN's weights
SHAPE_KEYS = ("tokenizer.kind", "tokenizer.vocab_size", "model.cell", "model.layers", "model.embedding_size",
              "model.hidden_size", "model.tie_weights", "model.attention_window")
COUNT_CHUNK = 1 << 22  # ids compared at a time when counting <unk> (a memmap of any size)


def finetune_config(init_from: Path, config_path: Path | None, overrides: list[str],
                    warn: Callable[[str], None] | None = None) -> tuple[Config, Saved]:
    """The fine-tuning run's config (RUN's, then the file, then the overrides) and RUN as read.
    A shape key set to another value than RUN's is an error naming every such key."""
    saved = read_saved(init_from, warn)
    config = load_config(config_path, overrides, base=saved.config)
    check_shape_keys(config, saved.config, init_from)
    return config, saved


def check_new_run_dir(run_dir: Path, init_from: Path) -> None:
    """The fine-tuned run is a new directory: RUN itself is never replaced (not even with --force)."""
    home = init_from if init_from.is_dir() else init_from.parent
    if run_dir.resolve() == home.resolve():
        raise LmtrainError(f"--init-from {init_from}: the fine-tuned run needs a directory of its own, not {run_dir} "
                           "(give another --run-dir)")


def key_value(config: Config, name: str) -> Any:
    section, key = name.split(".")
    return to_dict(config)[section][key]


def check_shape_keys(config: Config, trained: Config, init_from: Path) -> None:
    conflicts = [(name, key_value(config, name), key_value(trained, name)) for name in SHAPE_KEYS
                 if key_value(config, name) != key_value(trained, name)]
    if conflicts:
        listed = ", ".join(f"{name} = {new!r} (RUN has {old!r})" for name, new, old in conflicts)
        raise LmtrainError(f"--init-from {init_from}: {listed}: fine-tuning keeps RUN's model shape and vocabulary; "
                           f"drop {'this key' if len(conflicts) == 1 else 'these keys'} from the config file and the overrides (--config, --set)")


def unknown_count(tokens: np.ndarray) -> int:
    return sum(int(np.count_nonzero(tokens[start : start + COUNT_CHUNK] == UNK_ID))
               for start in range(0, len(tokens), COUNT_CHUNK))


def unknown_shares(data: dict[str, TokenFile]) -> dict[str, float]:
    """The share of <unk> among each split's tokens (line ends included), and of all ("all")."""
    counts = {name: (unknown_count(split.tokens), len(split.tokens)) for name, split in data.items()}
    shares = {name: unknown / max(1, total) for name, (unknown, total) in counts.items()}
    shares["all"] = sum(u for u, _ in counts.values()) / max(1, sum(t for _, t in counts.values()))
    return shares


def unknown_note(shares: dict[str, float], init_from: Path) -> str:
    splits = ", ".join(f"{name} {share:.2%}" for name, share in shares.items() if name != "all")
    return (f"vocabulary: {init_from}'s, frozen: {shares['all']:.2%} of the new corpus' tokens are <unk> ({splits})"
            + ("; a new vocabulary needs a new run (without --init-from)" if shares["all"] > 0.05 else ""))


def origin(init_from: Path, saved: Saved, shares: dict[str, float]) -> dict[str, Any]:
    """What a fine-tuned run records of where it came from (its marker and every checkpoint)."""
    return {"run": str(init_from.resolve()), "checkpoint": str(saved.path.resolve()),
            "step": saved.progress.get("step"), "corpus": saved.corpus, "unknown_share": shares}
