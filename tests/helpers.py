"""Small generated corpora shared by the end-to-end tests (imported by name: pytest puts tests/ on the path)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a one every some cat dog bird fish child teacher farmer river house garden market "
    "sees finds likes carries follows watches builds sells near under over beside with "
    "quickly slowly happily quietly red small old green bright cold morning evening"
).split()


def make_lines(n: int, seed: int) -> list[str]:
    """`n` short, deterministic, English-ish sentences."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        lines.append(" ".join(words).capitalize() + ".")
    return lines


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


def write_corpus(folder: Path, newline: str = "\n", sizes=(300, 40, 40)) -> Path:
    """A corpus directory with train.txt, valid.txt and test.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (split, n) in enumerate(zip(("train", "valid", "test"), sizes)):
        write_lines(folder / f"{split}.txt", make_lines(n, seed), newline)
    return folder
