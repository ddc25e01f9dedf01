"""`lmtrain report`: report.md and curves.png from a run's records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.tools.report import read_records, summary, write_report


def fake_run(root: Path) -> Path:
    """A run directory with three epochs of hand-written records."""
    run = root / "run"
    run.mkdir()
    metrics, timing = [], []
    for epoch, (train_ppl, valid_ppl) in enumerate([(300.0, 200.0), (150.0, 140.0), (100.0, 145.0)], 1):
        step = 100 * epoch
        metrics.append({"kind": "train", "epoch": epoch, "step": step - 50, "lr": 1.0 / epoch, "loss": 5.0, "ppl": 150.0})
        timing.append({"kind": "train", "epoch": epoch, "step": step - 50, "tokens_per_s": 1000.0 * epoch, "elapsed_s": 60.0 * epoch - 30})
        metrics.append({"kind": "epoch", "epoch": epoch, "step": step, "lr": 1.0 / epoch, "train_loss": 5.0,
                        "train_ppl": train_ppl, "valid_loss": float(valid_ppl), "valid_ppl": valid_ppl})
        timing.append({"kind": "epoch", "epoch": epoch, "step": step, "tokens_per_s": 1000.0 * epoch, "elapsed_s": 60.0 * epoch})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + '{"kind": "tra')  # cut short
    (run / "timing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in timing))
    (run / "config.toml").write_text('[model]\nhidden_size = 200\n[train]\nlr = 1.0\n')
    return run


def test_summary_and_report(tmp_path):
    run = fake_run(tmp_path)
    records = read_records(run)
    assert len(records) == 6 and records[1]["elapsed_s"] == 60.0  # timing merged, the cut-short line left out
    facts = summary(records)
    assert (facts["best valid ppl"], facts["best epoch"], facts["last valid ppl"], facts["training minutes"]) == (140.0, 2, 145.0, 3.0)
    table, _ = write_report(run, with_plot=False)
    assert "| 2 | 200 | 0.5 | 150.00 | 140.00 | 2,000 | 2.0 |" in table
    report = (run / "report.md").read_text()
    assert "| best valid ppl | 140.0 |" in report and "| model.hidden_size | 200 |" in report
    assert "curves.png" not in report and not (run / "curves.png").exists()


def test_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    run = fake_run(tmp_path)
    _, plotted = write_report(run)
    assert plotted and (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![train and valid perplexity" in (run / "report.md").read_text()


def test_cli_report_errors(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "run directory not found" in result.stderr
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "has no metrics.jsonl" in result.stderr


def test_a_stop_record_is_a_row_and_a_skipped_epoch_has_no_train_ppl(tmp_path):
    """A train.max_steps stop mid-epoch ("kind": "stop") is validated like an epoch end; a
    stretch where every step was skipped (non-finite) has no train perplexity."""
    run = fake_run(tmp_path)
    whole = (run / "metrics.jsonl").read_text().rpartition("\n")[0]  # without fake_run's cut-short line
    with open(run / "metrics.jsonl", "w") as f:
        f.write(whole + "\n" + json.dumps({"kind": "stop", "epoch": 4, "step": 340, "lr": 0.25, "train_loss": None,
                                   "train_ppl": None, "valid_loss": 130.0, "valid_ppl": 130.0, "bad_steps": 40}) + "\n")
    facts = summary(read_records(run))
    assert (facts["best valid ppl"], facts["best epoch"], facts["steps"], facts["last train ppl"]) == (130.0, 4, 340, None)
    table, _ = write_report(run, with_plot=False)
    assert "| 4 (stop) | 340 | 0.25 | — | 130.00 |  |  |" in table
