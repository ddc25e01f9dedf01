"""A synthetic corpus whose best possible perplexity is known: the copy task.

Each line is K symbols drawn uniformly and independently from an alphabet of A, a separator,
and the same K symbols again; lines are independent of each other:

    s3 s0 s7 s7 s1 = s3 s0 s7 s7 s1          (K = 5)

With word tokenization a line is 2K + 2 tokens (K symbols, "=", K copies, the line's <eos>),
and every one of them is predicted once (the text is preceded by <eos>, see tokens.batchify).
A model that knows the format and remembers what it read can predict all but the first K
exactly: the separator, the copies and the <eos> follow from counting and memory. The first K
are uniform, log A nats each, whatever came before. So the best average NLL per token is
K log A / (2K + 2), and the optimum perplexity is exp(K log A / (2K + 2)).

A model that learns the format but remembers nothing must guess the copies as well:
exp(2K log A / (2K + 2)). Copying a symbol means carrying it across K + 1 steps while K others
come in, the kind of lag that gates are meant to bridge and a plain RNN struggles with.

Compare a model with the optimum on one evaluation stream (`lmtrain evaluate RUN --split valid
--batch-size 1`). With B streams the text is cut into B pieces, each started from a zero state,
mostly mid-line and with no memory of what is to be copied; and a model trained with its state
carried across windows rarely sees a zero state and mispredicts the first line after one. Both
raise the measured perplexity above what the model does on the running text.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from lmtrain.atomic import atomic_open
from lmtrain.errors import LmtrainError

SEPARATOR = "="
# The defaults of `lmtrain synth` and `python -m lmtrain.tools.compare`: a lag of K + 1 = 13 steps, which
# most gated cells learn to bridge in 3,000 steps and the plain RNN does not (docs/cells.md, "Comparing
# cells"). With 8 symbols instead of 4 there are more bits to carry, and within that budget the
# LSTM itself stayed near the no-memory perplexity, as the RNN does.
DEFAULT_K = 12
DEFAULT_ALPHABET = 4
SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")


def symbols(alphabet_size: int) -> list[str]:
    """The alphabet as short distinct words: s0 .. s{A-1}."""
    return [f"s{i}" for i in range(alphabet_size)]


def check_task(k: int, alphabet_size: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if alphabet_size < 2:
        raise ValueError(f"the alphabet needs at least 2 symbols, got {alphabet_size}")


def copy_task_lines(n_lines: int, k: int, alphabet_size: int, rng: random.Random) -> list[str]:
    """`n_lines` lines of K random symbols, the separator and the same K symbols again."""
    check_task(k, alphabet_size)
    alphabet = symbols(alphabet_size)
    lines = []
    for _ in range(n_lines):
        half = " ".join(rng.choices(alphabet, k=k))
        lines.append(f"{half} {SEPARATOR} {half}")
    return lines


def optimum_nll(k: int, alphabet_size: int) -> float:
    """The least possible average NLL per token (nats): K log A over the 2K + 2 tokens of a line."""
    check_task(k, alphabet_size)
    return k * math.log(alphabet_size) / (2 * k + 2)


def optimum_perplexity(k: int, alphabet_size: int) -> float:
    """The best perplexity any model can reach on the copy task: exp(K log A / (2K + 2))."""
    return math.exp(optimum_nll(k, alphabet_size))


def memoryless_perplexity(k: int, alphabet_size: int) -> float:
    """The perplexity of a model that knows the format but copies nothing: exp(2K log A / (2K + 2))."""
    return optimum_perplexity(k, alphabet_size) ** 2


def write_copy_corpus(
    out_dir: Path, *, k: int, alphabet_size: int, n_train: int, n_valid: int, n_test: int, seed: int,
    force: bool = False,
) -> dict[str, Path]:
    """Write train.txt, valid.txt and test.txt of the copy task to `out_dir`, each atomically.

    The three splits are drawn in that order from one generator seeded with `seed`, so the same
    arguments give the same files. A split already in `out_dir` (a corpus someone may be using)
    is overwritten only with `force`; without it, LmtrainError before anything is written.
    Returns the path of each split.
    """
    existing = [name for name in SPLIT_FILES if os.path.lexists(out_dir / name)]
    if existing and not force:
        raise LmtrainError(f"{out_dir} already holds {', '.join(existing)}: pass --force to overwrite "
                           f"{', '.join(SPLIT_FILES)}, or choose another directory")
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        if n < 1:
            raise ValueError(f"the {name} split needs at least 1 line, got {n}")
    rng = random.Random(seed)
    splits = {
        "train": copy_task_lines(n_train, k, alphabet_size, rng),
        "valid": copy_task_lines(n_valid, k, alphabet_size, rng),
        "test": copy_task_lines(n_test, k, alphabet_size, rng),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in splits.items():
        paths[name] = out_dir / f"{name}.txt"
        with atomic_open(paths[name]) as f:
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
    return paths
