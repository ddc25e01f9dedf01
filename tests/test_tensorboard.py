"""train.tensorboard = true: every metrics.jsonl record's numbers as TensorBoard scalars, read
back with TensorBoard's own reader and compared with metrics.jsonl."""

import json
import sys

import pytest

from helpers import TINY_WORD, assert_one_error, cli, ok, sets, train_small_run, write_small_corpus

SETTINGS = [*TINY_WORD, "train.max_steps=12", "train.log_interval=4", "train.epochs=1"]


def assert_events_are_metrics(run):
    """RUN/tensorboard's scalars, read with TensorBoard's own reader, are metrics.jsonl's numbers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for field, value in record.items():
            if field not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(f"{record['kind']}/{field}", []).append((record["step"], float(value)))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert "train/loss" in expected and sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)  # TensorBoard keeps float32


def test_the_events_hold_the_numbers_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    _, run = train_small_run(tmp_path, [*SETTINGS, "train.tensorboard=true"])
    assert_events_are_metrics(run)


def test_a_run_resumed_from_an_earlier_checkpoint_shows_metrics_jsonls_records(tmp_path):
    """Killed after its checkpoint (records past it written, then cut from metrics.jsonl on resume):
    the events past the checkpoint are hidden and written again, as the records are."""
    pytest.importorskip("tensorboard")
    settings = [*TINY_WORD, "train.max_steps=8", "train.log_interval=2", "train.checkpoint_every=4", "train.epochs=1",
                "train.tensorboard=true"]
    _, run = train_small_run(tmp_path, settings)
    kept = (run / "last.pt").read_bytes()  # at step 8
    ok(cli("train", "--resume", run, "--set", "train.max_steps=12"))
    (run / "last.pt").write_bytes(kept)  # as if killed after step 12's records but before its checkpoint
    ok(cli("train", "--resume", run, "--set", "train.max_steps=14"))
    assert_events_are_metrics(run)


def test_force_removes_the_event_files_with_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    corpus, run = train_small_run(tmp_path, [*SETTINGS, "train.tensorboard=true"])
    ok(cli("train", corpus, "--run-dir", run, "--force", *sets(*SETTINGS)))
    assert not (run / "tensorboard").exists()


def test_metrics_jsonl_is_the_same_with_tensorboard_on(tmp_path):
    pytest.importorskip("tensorboard")
    _, off = train_small_run(tmp_path / "off", SETTINGS)
    _, on = train_small_run(tmp_path / "on", [*SETTINGS, "train.tensorboard=true"])
    assert (off / "metrics.jsonl").read_bytes() == (on / "metrics.jsonl").read_bytes()
    assert not (off / "tensorboard").exists()


def test_without_the_package_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    corpus = write_small_corpus(tmp_path / "corpus")
    result = cli("train", corpus, "--run-dir", tmp_path / "run", *sets(*SETTINGS, "train.tensorboard=true"))
    assert "pip install 'lmtrain[tensorboard]'" in assert_one_error(result, "tensorboard")
    assert not (tmp_path / "run").exists()
