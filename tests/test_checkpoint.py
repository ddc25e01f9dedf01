"""Checkpoint integrity and safe loading (lmtrain/checkpoint.py): a checksum checked before loading,
the previous checkpoint kept, a full disk survived, and a crafted file that would run code refused.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_error_after_progress,
    assert_one_error,
    cli,
    ok,
    private_cache_one_thread,
    tree_bytes,
    write_small_corpus,
)

from lmtrain.checkpoint import load_checkpoint, save_checkpoint
import lmtrain.checkpoint
from lmtrain.errors import LmtrainError

SETTINGS = [
    "tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=1", "model.embedding_size=12",
    "model.hidden_size=16", "model.dropout=0.2", "train.batch_size=4", "train.bptt=12", "train.variable_bptt=true",
    "train.epochs=4", "train.log_interval=5", "train.checkpoint_every=6",
]
STOP, TOTAL = 40, 80  # a run stopped at STOP (mid-epoch 2), and one that went on to TOTAL


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield




def train(corpus: Path, run: Path, max_steps: int):
    sets = [arg for item in (*SETTINGS, f"train.max_steps={max_steps}") for arg in ("--set", item)]
    return ok(cli("train", corpus, "--run-dir", run, *sets))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a run stopped at STOP, an uninterrupted run to TOTAL)."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_small_corpus(root / "corpus")
    train(corpus, root / "stopped", STOP)
    train(corpus, root / "reference", TOTAL)
    return root / "stopped", root / "reference"


@pytest.fixture
def stopped(runs, tmp_path) -> Path:
    """A copy of the stopped run to damage."""
    return Path(shutil.copytree(runs[0], tmp_path / "run"))


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"progress": {"step": 1}, "w": torch.arange(3)})
    save_checkpoint(path, {"progress": {"step": 2}, "w": torch.arange(4)})
    assert load_checkpoint(path)["progress"]["step"] == 2
    assert load_checkpoint(tmp_path / "last.prev.pt")["progress"]["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]
    # the file is still an ordinary torch.save archive, which torch.load reads as it is
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4))


def test_a_truncated_checkpoint_is_named_and_resume_uses_the_previous_one(stopped, runs):
    last = stopped / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert_one_error(cli("evaluate", last), str(last), "damaged or truncated")
    result = ok(cli("train", "--resume", stopped, "--set", f"train.max_steps={TOTAL}"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(last) in warnings[0] and "last.prev.pt" in warnings[0], result.stderr
    # from the checkpoint before (step 36), the run still ends exactly where the uninterrupted one does
    assert (stopped / "metrics.jsonl").read_bytes() == (runs[1] / "metrics.jsonl").read_bytes()
    assert same_weights(stopped / "last.pt", runs[1] / "last.pt")
    assert (stopped / "last.pt.damaged").is_file()  # kept aside, out of the rotation


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_caught_by_the_checksum(stopped):
    best, last = stopped / "best.pt", stopped / "last.pt"
    stand_in = stopped / "best.prev.pt" if (stopped / "best.prev.pt").is_file() else last
    flip_a_bit(best)
    # a run directory: best.pt is reported on one line and the next good checkpoint evaluated
    result = ok(cli("evaluate", stopped, "--json"))
    assert result.stderr.splitlines() == [f"warning: {best} is damaged: its sha256 does not match the one it was "
                                          f"written with; using {stand_in} instead"]
    assert json.loads(result.stdout) == json.loads(ok(cli("evaluate", stand_in, "--json")).stdout)
    # a checkpoint named on the command line: an error, nothing stands in for it
    flip_a_bit(last)
    assert_one_error(cli("evaluate", last), str(last), "sha256 does not match")


class FullDisk:
    """A file whose write stores half of the data, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_the_checkpoints_intact(stopped, runs, monkeypatch):
    real_open = lmtrain.checkpoint.atomic_open

    @contextmanager
    def full_disk_open(path, **kwargs):
        with real_open(path, **kwargs) as f:
            yield FullDisk(f)

    before = tree_bytes(stopped)
    monkeypatch.setattr(lmtrain.checkpoint, "atomic_open", full_disk_open)
    result = cli("train", "--resume", stopped, "--set", f"train.max_steps={TOTAL}")
    assert_error_after_progress(result, f"cannot write checkpoint {stopped / 'last.pt'}", "No space left on device",
                     "the checkpoint there before is intact", f"lmtrain train --resume {stopped}")
    after = tree_bytes(stopped)
    for name in ("last.pt", "last.prev.pt"):
        assert after[name] == before[name], name
    # resume first puts best.pt back to the best epoch end before the checkpoint (the stop at STOP
    # wrote one): a whole checkpoint from before, not one the full disk cut short
    assert after["best.pt"] in (before["best.pt"], before.get("best.prev.pt"))
    assert load_checkpoint(stopped / "best.pt")["progress"]["at"] == "epoch"
    assert not [name for name in after if name.endswith(".part")]
    monkeypatch.undo()  # space again: the same resume goes through and ends as the uninterrupted run
    ok(cli("train", "--resume", stopped, "--set", f"train.max_steps={TOTAL}"))
    assert (stopped / "metrics.jsonl").read_bytes() == (runs[1] / "metrics.jsonl").read_bytes()
    assert same_weights(stopped / "last.pt", runs[1] / "last.pt")


# --- safe loading: a checkpoint whose unpickling would run code ---------------------------------


class RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class TouchesFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def crafted(path: Path, marker: Path, gadget, with_checksum: bool, base: dict | None = None) -> Path:
    """A checkpoint with a code-running object in it: through our writer (a valid checksum: the
    checksum guards against damage, not against an author) or torch.save alone (a version 1 file)."""
    payload = {**(base or {}), "progress": {"step": 1, "at": "epoch"}, "extra": gadget(marker)}
    if with_checksum:
        save_checkpoint(path, payload, keep_previous=False)
    else:
        torch.save({"format": "lmtrain-checkpoint", "version": 1, **payload}, path)
    return path


@pytest.mark.parametrize("with_checksum", [True, False], ids=["checksummed", "plain-torch-save"])
@pytest.mark.parametrize("gadget", [RunsShell, TouchesFile], ids=["os.system", "Path.touch"])
def test_evaluate_refuses_a_checkpoint_that_would_run_code(tmp_path, gadget, with_checksum):
    marker = tmp_path / "MARKER"
    path = crafted(tmp_path / "evil.pt", marker, gadget, with_checksum)
    result = cli("evaluate", path)
    assert_one_error(result, str(path), "safe load refuses")
    assert not marker.exists()


def test_a_crafted_checkpoint_in_a_run_is_refused_not_skipped(stopped, tmp_path):
    """A run directory falls back from a damaged checkpoint, never from a crafted one."""
    marker = tmp_path / "MARKER"
    base = load_checkpoint(stopped / "last.pt")
    for name in ("best.pt", "last.pt"):
        crafted(stopped / name, marker, RunsShell, True, base)
    before = tree_bytes(stopped)
    assert_one_error(cli("evaluate", stopped), str(stopped / "best.pt"), "safe load refuses")
    assert_one_error(cli("train", "--resume", stopped, "--set", f"train.max_steps={TOTAL}"),
                     str(stopped / "last.pt"), "safe load refuses")
    assert not marker.exists()
    assert tree_bytes(stopped) == before


def test_configs_are_read_as_toml_only(tmp_path):
    marker = tmp_path / "MARKER"
    python = tmp_path / "config.py"
    python.write_text(f"import os\nos.system('touch {marker}')\n")
    pickled = tmp_path / "config.pkl"
    torch.save({"x": RunsShell(marker)}, pickled)
    for path in (python, pickled):
        assert_one_error(cli("train", "--config", path, "--run-dir", tmp_path / "run"), str(path), "not valid TOML")
    assert not marker.exists() and not (tmp_path / "run").exists()
    with pytest.raises(LmtrainError):
        load_checkpoint(python)


# --- a small file that would expand when read ---------------------------------------------------


def test_a_compressed_archive_is_refused_before_it_expands(tmp_path):
    """torch.load inflates deflated records, so a few kilobytes could ask for gigabytes; lmtrain
    refuses any record torch.save would not have written (it stores them as they are)."""
    plain = tmp_path / "plain.pt"
    torch.save({"format": "lmtrain-checkpoint", "version": 1, "weights": torch.zeros(10_000_000)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for record in src.infolist():
            dst.writestr(record.filename, src.read(record))
    assert bomb.stat().st_size < plain.stat().st_size // 100  # 40 MB of weights in under 400 kB
    assert torch.load(bomb, weights_only=True)["weights"].numel() == 10_000_000  # what torch alone would do
    for command in (("evaluate", bomb), ("generate", bomb)):
        assert_one_error(cli(*command), str(bomb), "is compressed")
    assert load_checkpoint(plain)["weights"].numel() == 10_000_000  # the stored original still loads
