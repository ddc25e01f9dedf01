"""`make gpu-check` (lmtrain.tools.gpu_check, gpu_report) where there is no GPU: its one line and exit code,
the step runner (failures, timeouts, a missing command, each recorded and the next step run), the choice
of Python, the report from made-up results, and the time limits adding up to 8 minutes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lmtrain.tools.gpu_check as gpu_check
from lmtrain.tools.gpu_check import OVERHEAD_S, STEP_LIMITS_S, TOTAL_LIMIT_S, TRAIN_STEPS, Step, check_steps, run_steps
from lmtrain.tools.gpu_report import StepResult, write_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "lmtrain" / "tools" / "gpu_check.py"
no_gpu_here = pytest.mark.skipif(bool(gpu_check.find_gpus()), reason="this machine has an NVIDIA GPU: the check would run")


def python_says(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def fake_python(folder: Path, found: dict) -> Path:
    """An executable that answers the probe as a Python with the given torch would."""
    path = folder / "bin" / "python"
    path.parent.mkdir(parents=True)
    path.write_text(f"#!/bin/sh\necho '{json.dumps(found)}'\n")
    path.chmod(0o755)
    return path


@no_gpu_here
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2_before_installing(tmp_path):
    """Run as make runs it, as a file; a torch that fails to import proves it never imports one."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('gpu_check imported torch')\n")
    venv = tmp_path / "venv-gpu"
    done = subprocess.run([sys.executable, str(SCRIPT), "--venv", str(venv), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["error: no NVIDIA GPU on this machine (nvidia-smi lists none, no /dev/nvidia0): gpu-check needs one"]
    assert not venv.exists() and not (tmp_path / "out").exists()


@no_gpu_here
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_exits_2_here(tmp_path):
    done = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_VENV={tmp_path / 'venv'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("error: no NVIDIA GPU on this machine")


def test_gpus_are_found_by_nvidia_smi_or_the_driver_files_not_by_torch(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.03, 143771 MiB'\n")
    smi.chmod(0o755)
    assert gpu_check.find_gpus(str(smi), ()) == ["NVIDIA H200, 580.159.03, 143771 MiB"]
    (tmp_path / "gpus").mkdir()
    (tmp_path / "nvidia0").write_text("")
    absent = str(tmp_path / "no-nvidia-smi")
    assert gpu_check.find_gpus(absent, (str(tmp_path / "gpus"),)) == []  # the driver's folder, empty
    assert gpu_check.find_gpus(absent, (str(tmp_path / "nvidia0"),)) == [f"a GPU at {tmp_path / 'nvidia0'}"]


def test_a_failing_step_is_recorded_and_the_next_steps_still_run(tmp_path):
    steps = [
        Step("fails", [python_says("import sys; print('it broke', file=sys.stderr); sys.exit(3)"),
                       python_says("import sys; sys.exit('and then this')")], 30),  # the first failure is the one told
        Step("cannot_start", [[str(tmp_path / "no-such-python")]], 30),
        Step("slow", [python_says("import time; time.sleep(60)")], 1),
        Step("doctor", [python_says("import sys; sys.exit(\"Error: No such command 'doctor'.\")")], 30, missing_when="No such command"),
        Step("unreadable", [python_says("print('not json')")], 30, read=json.loads),
        Step("skipped", [python_says("")], 30, skip="no CUDA"),
        Step("judged", [python_says("print(2)")], 30, read=lambda out: {"skipped": int(out)},
             judge=lambda figures: f"{figures['skipped']} skipped"),
        Step("fine", [python_says("print('{\"tokens_per_s\": 5.0}')"), python_says("print('second')")], 30,
             read=lambda out: json.loads(out.splitlines()[0])),
    ]
    results = {r.name: r for r in run_steps(steps, tmp_path / "logs")}
    assert (results["fails"].status, results["fails"].exit_code, results["fails"].note) == ("failed", 3, "it broke")
    assert results["cannot_start"].status == "failed" and "could not start" in results["cannot_start"].note
    assert results["slow"].status == "timeout" and results["slow"].seconds < 20
    assert (results["doctor"].status, results["doctor"].note) == ("missing", "this lmtrain has no `doctor` command yet")
    assert results["unreadable"].status == "ok" and "could not be read (JSONDecodeError" in results["unreadable"].note
    assert (results["skipped"].status, results["skipped"].note) == ("skipped", "no CUDA")
    assert (results["judged"].status, results["judged"].note, results["judged"].figures) == ("failed", "2 skipped", {"skipped": 2})
    assert (results["fine"].status, results["fine"].figures) == ("ok", {"tokens_per_s": 5.0})
    assert (tmp_path / "logs" / "fine.out").read_text().splitlines() == ['{"tokens_per_s": 5.0}', "second"]
    assert (tmp_path / "logs" / "fails.err").read_text().splitlines() == ["it broke", "and then this"]


def test_the_time_limits_add_up_to_eight_minutes_at_most(tmp_path):
    assert TOTAL_LIMIT_S == 8 * 60
    assert sum(STEP_LIMITS_S.values()) + OVERHEAD_S <= TOTAL_LIMIT_S
    steps = check_steps("python", tmp_path, tmp_path)
    assert {"probe", "install", *(s.name for s in steps)} == set(STEP_LIMITS_S)  # no step without its limit
    assert all(s.limit_s == STEP_LIMITS_S[s.name] for s in steps)


def test_the_steps_run_doctor_the_cuda_tests_bench_and_ptb_medium(tmp_path):
    steps = {s.name: s for s in check_steps("py", tmp_path / "out", tmp_path / "data")}
    assert steps["doctor"].commands == [["py", "-m", "lmtrain", "doctor", "--json"]]
    assert steps["cuda_tests"].commands[0][-3:] == ["-m", "cuda", "tests"]
    assert steps["bench"].commands == [["py", "-m", "lmtrain", "bench", "--preset", "issue7", "--device", "cuda", "--json"]]
    train = steps["train"].commands[0]
    assert train[3:5] == ["train", str(tmp_path / "data" / "ptb")]
    assert f"train.max_steps={TRAIN_STEPS}" in train and "configs/ptb-medium.toml" in train and "train.device=cuda" in train
    assert not any(s.skip for s in steps.values())
    judge = steps["cuda_tests"].judge
    assert judge({"passed": 8, "deselected": 1140}) == ""
    assert judge({"passed": 6, "skipped": 2}) == "2 skipped on a GPU machine (logs/cuda_tests.out says why)"
    assert judge({"deselected": 1140}) == "no test ran"
    no_data = {s.name: s for s in check_steps("py", tmp_path, None)}
    assert no_data["train"].skip.startswith("no PTB here")
    no_cuda = [s.name for s in check_steps("py", tmp_path, tmp_path, no_cuda="no CUDA torch") if s.skip]
    assert no_cuda == ["cuda_tests", "bench", "train"]


def test_torch_comes_from_the_wheel_folder_or_the_index(tmp_path):
    wheels = gpu_check.install_commands(tmp_path / "v", "2.13.0", None, tmp_path / "wheels")
    assert all(c[c.index("--find-links") + 1] == str(tmp_path / "wheels") and "--no-index" in c for c in wheels)
    assert wheels[0][-1] == "torch==2.13.0"
    index = gpu_check.install_commands(tmp_path / "v", "2.13.0", "https://example.org/whl/cu130", None)
    assert index[0][-3:] == ["--index-url", "https://example.org/whl/cu130", "torch==2.13.0"]
    assert "typer>=0.12" in index[1] and "pytest>=8" in index[1]
    assert not any(a.startswith(("torch", "triton")) for a in index[1])


def test_a_python_whose_torch_sees_the_gpu_is_used_as_it_is(tmp_path):
    cpu = fake_python(tmp_path / "cpu", {"torch": "2.13.0+cpu", "cuda": None, "device": None, "missing": []})
    gpu = fake_python(tmp_path / "gpu", {"torch": "2.11.0+cu130", "cuda": "13.0", "device": "NVIDIA H200", "missing": []})
    python, found, install = gpu_check.prepare_python(tmp_path / "cpu", tmp_path / "gpu", "2.13.0", None, None, tmp_path / "logs")
    assert (python, found["device"], install.status) == (str(gpu), "NVIDIA H200", "present")
    assert install.note == f"{gpu} has torch 2.11.0+cu130, not the pinned 2.13.0"
    assert gpu_check.choose_python([str(cpu)], time.monotonic() + 60)[2] == [f"{cpu}: torch 2.13.0+cpu sees no GPU (a CPU build)"]


def test_this_machines_torch_is_judged_by_a_probe():
    found = gpu_check.probe(sys.executable, 120)
    assert found["torch"].startswith("2.") and found["missing"] == []
    if found["device"] is None:
        assert "sees no GPU" in gpu_check.why_not("py", found)


def test_pytest_counts_and_training_figures_are_read(tmp_path):
    out = "........\n8 passed, 1127 deselected in 41.20s\nF.\n1 failed, 1 passed, 2 errors in 3.0s\n"
    assert gpu_check.read_pytest(out) == {"passed": 9, "deselected": 1127, "failed": 1, "error": 2}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 100}\n{"kind": "stop", "step": 2000, "valid_ppl": 150.5, "train_ppl": 170.0}\n')
    (run / "timing.jsonl").write_text("".join(json.dumps({"kind": k, "tokens_per_s": t, "elapsed_s": e}) + "\n"
                                              for k, t, e in [("train", 1000.0, 5), ("train", 90000.0, 6), ("train", 91000.0, 7),
                                                              ("stop", 80000.0, 30.5)]))
    assert gpu_check.read_training(run) == {"steps": 2000, "valid_ppl": 150.5, "train_ppl": 170.0, "tokens_per_s": 90000.0,
                                            "tokens_per_s_last_epoch": 80000.0, "train_elapsed_s": 30.5}


FACTS = {"started": "2026-11-20 10:00:00 +0000", "gpus": ["NVIDIA H200, 580.159.03, 143771 MiB"], "device": "NVIDIA H200",
         "torch": "2.13.0+cu130", "cuda": "13.0", "python": ".venv-gpu/bin/python", "pinned_torch": "2.13.0",
         "limits_s": STEP_LIMITS_S}
BENCH_RECORD = {"what": "step", "cell": "lstm", "impl": "ours+graphs", "layers": 2, "hidden_size": 650, "batch_size": 20,
                "bptt": 35, "dtype": "bf16", "device": "cuda", "tokens_per_s": 412345.6, "peak_mem_mb": 81.25,
                "reference": "torch.nn.LSTM", "ratio_vs_reference": 1.31, "ratio_vs_our_lstm": 1.12}


def test_the_report_is_written_as_markdown_and_json(tmp_path):
    results = [
        StepResult("install", "present", 4.2, 100, note=".venv-gpu/bin/python has torch 2.13.0+cu130"),
        StepResult("doctor", "missing", 1.5, 30, 2, "this lmtrain has no `doctor` command yet"),
        StepResult("cuda_tests", "failed", 61.0, 100, 1, "1 failed | see the log", {"passed": 7, "failed": 1, "deselected": 1127}),
        StepResult("bench", "ok", 98.1, 110, 0, figures={"records": [BENCH_RECORD]}),
        StepResult("train", "ok", 80.4, 120, 0, figures={"steps": 2000, "valid_ppl": 151.234, "tokens_per_s": 95000.0}),
    ]
    md_path, json_path = write_report(tmp_path / "report", FACTS, results)
    report = json.loads(json_path.read_text())
    assert report["device"] == "NVIDIA H200" and report["torch"] == "2.13.0+cu130" and report["total_s"] == 245.2
    assert [(s["name"], s["status"]) for s in report["steps"]] == [(r.name, r.status) for r in results]
    assert report["steps"][4]["figures"]["valid_ppl"] == 151.234
    md = md_path.read_text()
    assert "- GPU: NVIDIA H200 (nvidia-smi: NVIDIA H200, 580.159.03, 143771 MiB)" in md
    assert "- torch 2.13.0+cu130, CUDA 13.0 (the Makefile pins 2.13.0)" in md
    assert f"- 4 of 5 steps passed in 245.2 s (their limits add up to {sum(STEP_LIMITS_S.values())} s)" in md
    assert "| cuda_tests | failed | 61.0 | 100 | 7 passed, 1 failed, 1127 deselected | 1 failed / see the log |" in md
    assert "| train | ok | 80.4 | 120 | 2,000 steps, valid ppl 151.23, 95,000 tokens/s |  |" in md
    assert "| step | lstm | ours+graphs | 2 | 650 | 20 | 35 | bf16 | 412,346 | 81.25 | torch.nn.LSTM | 1.31 | 1.12 |" in md
    assert "## ptb-medium, 2,000 steps" in md


def test_main_runs_the_steps_and_says_where_the_report_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "find_gpus", lambda: ["NVIDIA H200, 580.159.03, 143771 MiB"])
    monkeypatch.setattr(gpu_check, "prepare_python", lambda *args: (
        sys.executable, {"torch": "2.13.0+cu130", "cuda": "13.0", "device": "NVIDIA H200"},
        StepResult("install", "present", 0.1, 100, note="already there")))
    monkeypatch.setattr(gpu_check, "check_steps", lambda python, out_dir, data, no_cuda: [
        Step("doctor", [[python, "-c", "print('{\"ok\": true}')"]], 30, lambda out: {"report": json.loads(out)})])
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"gpu-check: {tmp_path / 'out' / 'report.md'} and {tmp_path / 'out' / 'report.json'}\n"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["steps"][1]["figures"] == {"report": {"ok": True}}


def test_bad_options_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "find_gpus", lambda: ["NVIDIA H200"])
    assert gpu_check.main(["--torch-index", "https://example.org", "--torch-wheels", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: give TORCH_INDEX or TORCH_WHEELS, not both\n"
    assert gpu_check.main(["--torch-wheels", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == f"error: TORCH_WHEELS={tmp_path / 'none'} is not a folder\n"
