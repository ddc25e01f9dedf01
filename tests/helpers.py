"""Small generated corpora shared by the end-to-end tests (imported by name: pytest puts tests/ on the path)."""

from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

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


# the corpus the end-to-end tests train on (lines of train, valid, test): big enough for a word
# tokenizer of 80 types and a few dozen windows, small enough to train in about a second
SMALL_CORPUS = (150, 20, 20)
# the tiny word-level model those tests train, as --set items; each module adds its own train.*
# keys (steps, logging, checkpoints) after these
TINY_WORD = [
    "tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=1", "model.embedding_size=12",
    "model.hidden_size=16", "train.batch_size=4", "train.bptt=12",
]


def write_small_corpus(folder: Path) -> Path:
    """write_corpus with SMALL_CORPUS's sizes."""
    return write_corpus(folder, sizes=SMALL_CORPUS)


def sets(*items: str) -> list[str]:
    """--set items as command-line arguments: sets("a=1", "b=2") -> ["--set", "a=1", "--set", "b=2"]."""
    return [arg for item in items for arg in ("--set", item)]


def train_small_run(root: Path, settings: list[str]) -> tuple[Path, Path]:
    """(root/corpus, root/run): a small corpus and a finished `lmtrain train` run on it with the
    --set items `settings`."""
    corpus = write_small_corpus(root / "corpus")
    ok(cli("train", corpus, "--run-dir", root / "run", *sets(*settings)))
    return corpus, root / "run"


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error(result, *fragments: str) -> str:
    """Exit code 2, no traceback, and exactly one `error: ...` line on stderr, the last one, naming
    the problem; the only other lines allowed are train's `corpus: ...` line, printed once the
    corpus has been read. Returns the error line."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(line.startswith("corpus: ") for line in lines[:-1]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_error_after_progress(result, *fragments: str) -> str:
    """As assert_one_error, for a run that fails mid-training: the progress it printed before may
    precede the one `error: ...` line, which must still be the last, on a line of its own."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstderr:\n{result.stderr}\n{result.exception!r}"
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@contextmanager
def private_cache_one_thread(tmp_path_factory):
    """For a test module: a private tokenizer/token cache and working directory, and one torch
    thread (these models are too small to gain from threads, and the same float sums come out in
    every run)."""
    import pytest
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield
    torch.set_num_threads(threads)


def cli(*args):
    """Invoke the CLI in-process; stdout and stderr are kept apart (result.stdout, result.stderr)."""
    from typer.testing import CliRunner

    from lmtrain.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
    return result


def assert_config_refused(tmp_path: Path, items: list[str], fragment: str, match: str) -> None:
    """The --set `items` are refused by load_config (an LmtrainError matching `match`) and by
    `lmtrain train` on a small corpus with one error line holding `fragment`, no run directory made."""
    from lmtrain.config import load_config
    from lmtrain.errors import LmtrainError

    with pytest.raises(LmtrainError, match=match):
        load_config(None, items)
    result = cli("train", write_small_corpus(tmp_path / "corpus"), "--run-dir", tmp_path / "run", *sets(*items))
    assert_one_error(result, fragment)
    assert not (tmp_path / "run").exists()


def assert_trains_in_bf16(items: list[str], state_lengths: list[int]) -> None:
    """A model of the --set `items` (tiny: embedding 6, hidden 5) runs a window with bfloat16
    products, its state of `state_lengths` tensors per layer, and every parameter gets a finite gradient."""
    from lmtrain.config import load_config
    from lmtrain.model import LanguageModel

    config = load_config(None, ["model.embedding_size=6", "model.hidden_size=5", *items]).model
    torch.manual_seed(0)
    model = LanguageModel(config, 11)
    tokens = torch.randint(0, 11, (6, 3))
    logits, state = model(tokens[:-1], model.init_state(3), torch.bfloat16)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[1:].flatten()).backward()
    assert [len(s) for s in state] == state_lengths
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def resume_matches_straight(tmp_path: Path, keys: list[str], between=None) -> Path:
    """8 steps of `lmtrain train --set keys` straight, and 4 then `--resume` to 8 (`between(run)`
    looks at the stopped run first): the two end with the same weights, key for key, to the bit.
    Returns the resumed run's directory."""
    from lmtrain.model import load_run

    corpus = write_small_corpus(tmp_path / "corpus")
    ok(cli("train", corpus, "--run-dir", tmp_path / "straight", *sets(*keys, "train.max_steps=8")))
    ok(cli("train", corpus, "--run-dir", tmp_path / "stopped", *sets(*keys, "train.max_steps=4")))
    if between is not None:
        between(tmp_path / "stopped")
    ok(cli("train", "--resume", tmp_path / "stopped", "--set", "train.max_steps=8"))
    straight, resumed = (load_run(tmp_path / name, torch.device("cpu")).model.state_dict() for name in ("straight", "stopped"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    return tmp_path / "stopped"


def evaluate_and_generate(run: Path) -> dict:
    """A trained run scores its valid split to a finite perplexity, the same twice, and samples the
    same non-empty text twice from one seed; returns the metrics."""
    metrics = json.loads(ok(cli("evaluate", run, "--split", "valid", "--json")).stdout)
    assert metrics["tokens"] > 0 and math.isfinite(metrics["ppl"])
    assert json.loads(ok(cli("evaluate", run, "--split", "valid", "--json")).stdout)["ppl"] == metrics["ppl"]
    first = ok(cli("generate", run, "--seed", "3", "--max-tokens", "8")).stdout
    assert first.strip() and first == ok(cli("generate", run, "--seed", "3", "--max-tokens", "8")).stdout
    return metrics


def needs_cuda(why: str):
    """Skip a test where torch sees no GPU, and mark it `cuda`: `pytest -m cuda` (make gpu-check) runs
    every test so marked, as the first thing a GPU machine checks."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs CUDA: {why}")
    return lambda test: pytest.mark.cuda(skip(test))
