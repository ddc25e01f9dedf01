"""Bad input to `lmtrain train`, `train --resume` and `evaluate`, through the CLI: each gives exactly
one `error: ...` line on stderr and exit 2, no traceback, and leaves every file as it was (no
temporary file, nothing half-written). Corpus errors are in tests/test_cli.py.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    TINY_WORD,
    assert_one_error,
    cli,
    private_cache_one_thread,
    sets,
    train_small_run,
    tree_bytes,
)

from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.config import SECTIONS, Config, from_dict, to_toml

SETTINGS = [
    *TINY_WORD, "train.log_interval=4",
    "train.checkpoint_every=6", "train.max_steps=12",
]


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(corpus, a finished run of 12 steps)."""
    return train_small_run(tmp_path_factory.mktemp("trained"), SETTINGS)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run to try things on."""
    return Path(shutil.copytree(trained[1], tmp_path / "run"))


def assert_unchanged(folder: Path, before: dict[str, bytes]) -> None:
    after = tree_bytes(folder)
    assert after == before, sorted(set(after) ^ set(before)) or "a file changed"


# --- config: unknown keys, wrong types, out-of-range values ---------------------------------------

CONFIG_ERRORS = {
    "unknown-key": (["train.learnin_rate=1"], ["train.learnin_rate", "unknown config key"]),
    "unknown-section": (["optimizer.lr=1"], ["optimizer", "unknown config section"]),
    "wrong-type-int": (["train.batch_size=abc"], ["train.batch_size", "must be int", "abc"]),
    "wrong-type-float": (["train.lr=fast"], ["train.lr", "must be float"]),
    "float-for-int": (["model.hidden_size=1.5"], ["model.hidden_size", "must be int"]),
    "bool-for-int": (["train.epochs=true"], ["train.epochs", "must be int"]),
    "wrong-type-bool": (["model.tie_weights=1"], ["model.tie_weights", "must be bool"]),
    "negative-size": (["model.hidden_size=-8"], ["model.hidden_size", "positive"]),
    "zero-layers": (["model.layers=0"], ["model.layers", "positive"]),
    "dropout-1": (["model.dropout=1.0"], ["model.dropout", "[0, 1)"]),
    "dropout-hidden-1": (["model.dropout_hidden=1"], ["model.dropout_hidden", "below 1"]),
    "weight-drop-negative": (["model.weight_drop=-0.1"], ["model.weight_drop", "[0, 1)"]),
    "nan-lr": (["train.lr=nan"], ["train.lr", "finite"]),
    "inf-clip": (["train.clip=inf"], ["train.clip", "finite"]),
    "lr-decay-below-1": (["train.lr_decay=0.5"], ["train.lr_decay", "at least 1"]),
    "tiny-vocab": (["tokenizer.vocab_size=2"], ["tokenizer.vocab_size", "at least 3"]),
    "negative-seed": (["train.seed=-1"], ["train.seed", "negative"]),
    "negative-checkpoint-every": (["train.checkpoint_every=-1"], ["train.checkpoint_every", "negative"]),
    "negative-max-bad-steps": (["train.max_bad_steps=-1"], ["train.max_bad_steps", "negative"]),
    "nothing-to-train": (["train.epochs=0", "train.max_steps=0"], ["train.epochs", "train.max_steps"]),
}


@pytest.mark.parametrize("items, fragments", CONFIG_ERRORS.values(), ids=CONFIG_ERRORS.keys())
def test_train_refuses_a_bad_config(trained, tmp_path, items, fragments):
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS, *items))
    assert_one_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_in_a_toml_file_names_the_file(trained, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[train]\nbptt = "long"\n')
    result = cli("train", trained[0], "--config", config, "--run-dir", tmp_path / "run")
    assert_one_error(result, str(config), "train.bptt", "must be int")
    assert not (tmp_path / "run").exists()


# keys whose negative values mean something: a fallback to model.dropout, or a bias of either sign
NEGATIVE_ALLOWED = {"model.dropout_input", "model.dropout_hidden", "model.dropout_output", "model.forget_bias"}
NUMERIC_KEYS = [
    f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.type in ("int", "float")
]


@pytest.mark.parametrize("key", sorted(set(NUMERIC_KEYS) - NEGATIVE_ALLOWED))
def test_every_numeric_key_refuses_a_negative_value(trained, tmp_path, key):
    """Every numeric key, present and future, is range-checked (the list above names the exceptions)."""
    result = cli("train", trained[0], "--run-dir", tmp_path / "run", *sets(*SETTINGS, f"{key}=-1"))
    assert_one_error(result, key)
    assert not (tmp_path / "run").exists()


# --- run directories ----------------------------------------------------------------------------


def test_an_existing_run_is_kept_without_resume_or_force(trained, run):
    before = tree_bytes(run)
    assert_one_error(cli("train", trained[0], "--run-dir", run, *sets(*SETTINGS)),
                     str(run), "already holds a run", f"lmtrain train --resume {run}", "--force")
    assert_one_error(cli("train", "--resume", run, "--force"), "--resume", "--force")
    assert_unchanged(run, before)


def test_force_replaces_an_existing_run(trained, run):
    """--force replaces the run's own files and keeps the user's (lmtrain.runs)."""
    (run / "notes.txt").write_text("old")
    result = cli("train", trained[0], "--run-dir", run, "--force", *sets(*SETTINGS, "train.max_steps=4"))
    assert result.exit_code == 0, result.stderr
    assert (run / "notes.txt").read_text() == "old"
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 4


def test_resume_refuses_a_finished_run(run):
    before = tree_bytes(run)
    assert_one_error(cli("train", "--resume", run), str(run), "has finished", "train.max_steps = 12", "--set")
    assert_unchanged(run, before)


def test_resume_refuses_a_run_without_checkpoint(run):
    for name in ("last.pt", "last.prev.pt"):
        (run / name).unlink(missing_ok=True)
    before = tree_bytes(run)
    assert_one_error(cli("train", "--resume", run, *sets("train.max_steps=24")), str(run), "no checkpoint to resume")
    assert_unchanged(run, before)


def test_resume_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_error(cli("train", "--resume", tmp_path), str(tmp_path), "not an lmtrain run directory")
    assert_one_error(cli("train", "--resume", tmp_path / "nope"), "run directory not found")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("key", ["model.hidden_size=32", "train.lr=0.5", "tokenizer.vocab_size=60"])
def test_resume_refuses_to_change_how_the_run_trains(run, key):
    before = tree_bytes(run)
    assert_one_error(cli("train", "--resume", run, *sets("train.max_steps=24", key)),
                     f"--set {key.partition('=')[0]}", "train.max_steps, train.epochs, train.max_minutes")
    assert_unchanged(run, before)


def test_resume_refuses_an_edited_config_toml(run):
    config = run / "config.toml"
    config.write_text(config.read_text().replace("hidden_size = 16", "hidden_size = 32"))
    before = tree_bytes(run)
    assert_one_error(cli("train", "--resume", run, *sets("train.max_steps=24")),
                     str(config), "model.hidden_size = 32", "trained with 16")
    assert_unchanged(run, before)


def resized(payload: dict, **model) -> dict:
    """The payload with its config's model section changed, the weights left as they were."""
    config = {**payload["config"], "model": {**payload["config"]["model"], **model}}
    return {**payload, "config": config}


def test_resume_refuses_weights_that_do_not_fit(run):
    """A last.pt and config.toml that agree on a shape its weights do not have."""
    payload = load_checkpoint(run / "last.pt")
    for name in ("last.pt", "last.prev.pt"):
        save_checkpoint(run / name, resized(payload, hidden_size=32), keep_previous=False)
    (run / "config.toml").write_text(to_toml(from_dict(resized(payload, hidden_size=32)["config"])))
    before = tree_bytes(run)
    assert_one_error(cli("train", "--resume", run, *sets("train.max_steps=24")),
                     str(run / "last.pt"), "do not fit the model")
    assert_unchanged(run, before)


@pytest.mark.parametrize("change", ["hidden_size", "vocab_size"])
def test_evaluate_refuses_weights_of_another_shape_or_vocabulary(run, tmp_path, change):
    payload = load_checkpoint(run / "best.pt")
    if change == "hidden_size":
        payload = resized(payload, hidden_size=32)
    else:
        payload = {**payload, "vocab_size": payload["vocab_size"] + 7}
    path = tmp_path / f"{change}.pt"
    save_checkpoint(path, payload, keep_previous=False)
    before = tree_bytes(tmp_path)
    assert_one_error(cli("evaluate", path), str(path), "do not fit the model")
    assert_unchanged(tmp_path, before)


def cannot_write(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except PermissionError:
        return True
    (folder / ".probe").unlink()
    return False


def run_without_root_file_access(test_name: str) -> None:
    """Run one test of this file in a child pytest whose root has lost CAP_DAC_OVERRIDE (CI runs as
    root, which file modes do not stop), and require that it ran and passed there."""
    child = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m", "pytest", "-q",
         "-p", "no:cacheprovider", f"{Path(__file__).name}::{test_name}"],
        cwd=Path(__file__).parent, env={**os.environ, "LMTRAIN_TEST_WITHOUT_DAC": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0 and "1 passed" in child.stdout, child.stdout[-3000:] + child.stderr[-3000:]


def test_a_read_only_run_directory(trained, run, tmp_path):
    run.chmod(0o555)
    try:
        if not cannot_write(run):  # root, or a file system that ignores modes
            if os.geteuid() == 0 and shutil.which("setpriv") and "LMTRAIN_TEST_WITHOUT_DAC" not in os.environ:
                run_without_root_file_access("test_a_read_only_run_directory")
                return
            pytest.skip("chmod 0o555 does not stop this user from writing, and setpriv cannot drop root's file access")
        before = tree_bytes(run)
        assert_one_error(cli("train", "--resume", run, *sets("train.max_steps=24")),
                         f"cannot write to run directory {run}", "Permission denied")
        assert_unchanged(run, before)
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o555)
        assert_one_error(cli("train", trained[0], "--run-dir", parent / "run", *sets(*SETTINGS)),
                         f"cannot create run directory {parent / 'run'}", "Permission denied")
        assert list(parent.iterdir()) == []
    finally:
        run.chmod(0o755)


def test_config_default_passes_validation():
    """The matrix above starts from a valid config: the defaults themselves validate."""
    from_dict(dataclasses.asdict(Config()))
