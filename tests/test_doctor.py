"""`lmtrain doctor`: its JSON schema, its exit codes, and a fault it must report."""

from __future__ import annotations

import json

from helpers import assert_one_error, cli

from lmtrain.config import CELLS
from lmtrain.model import dispatch, get_cell

PATH_FIELDS = {"device", "cell", "precision", "chosen", "reason", "runs", "check", "ms", "error"}


def test_json_report_covers_every_cell_and_precision_and_exits_0_when_all_pass():
    result = cli("doctor", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"lmtrain", "python", "torch", "cpu", "cuda", "triton", "extension", "paths", "other_paths",
            "fell_back", "status"} <= set(report)
    assert set(report["cpu"]["features"]) == {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}
    assert report["extension"]["status"] in ("loaded", "off", "failed") and report["extension"]["cache"]
    rows = {(p["cell"], p["precision"]): p for p in report["paths"]}
    assert set(rows) == {(c, p) for c in CELLS for p in ("fp32", "bf16")}
    for row in rows.values():
        assert set(row) == PATH_FIELDS and row["device"] == "cpu" and row["error"] is None and row["ms"] > 0
        assert row["check"] in ("passed", "not needed") and row["runs"] == row["chosen"]
        assert (row["check"] == "not needed") == (row["chosen"] in ("engine", "own"))  # the engine is the reference
        assert (row["chosen"] == "own") == (not dispatch.on_engine(get_cell(row["cell"])))  # a cell of its own layer
    assert report["status"] == "ok" and report["fell_back"] == {}


def test_a_failing_path_is_reported_and_exits_1(monkeypatch):
    monkeypatch.setenv("LMTRAIN_FAULT", "sequence:wrong")
    result = cli("doctor", "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    lstm = next(p for p in report["paths"] if (p["cell"], p["precision"]) == ("lstm", "fp32"))
    assert lstm["chosen"] == "sequence" and lstm["runs"] == "engine"
    assert lstm["check"].startswith("failed: its output 0 differs from the reference by 0.5")
    assert "sequence" in report["fell_back"] and report["status"] == "fell back"
    assert "warning: lmtrain's sequence path is off for this process" in result.stderr


def test_text_report_says_what_runs():
    result = cli("doctor", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "Paths (one forward + backward window" in result.stdout and "status: ok" in result.stdout
    assert any(line.split()[:3] == ["cpu", "lstm", "fp32"] for line in result.stdout.splitlines())


def test_usage_errors_exit_2_in_one_line(monkeypatch):
    assert_one_error(cli("doctor", "--device", "tpu"), "--device must be auto, cpu or cuda")
    monkeypatch.setenv("LMTRAIN_FAULT", "sequnce")
    assert_one_error(cli("doctor"), "LMTRAIN_FAULT: unknown path 'sequnce'")
    monkeypatch.delenv("LMTRAIN_FAULT")
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", "fast")
    assert_one_error(cli("doctor"), "LMTRAIN_FUSED_MODE must be one of compile, traced, eager")
