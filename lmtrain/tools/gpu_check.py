"""`make gpu-check`: everything worth knowing from the first GPU machine, in one command of at most 8 minutes.

    find the GPU (nvidia-smi, not torch) ─▶ a Python with a CUDA build of torch (found, or installed
    into .venv-gpu) ─▶ doctor ─▶ the CUDA tests ─▶ bench --preset issue7 ─▶ ptb-medium for TRAIN_STEPS
    ─▶ DIR/report.md and DIR/report.json

Each step runs as a subprocess under its own time limit (STEP_LIMITS_S); a step that fails or runs
out of time is recorded and the next one still runs.

Standard library only (and gpu_report beside it, which writes the report), run as a file (`python
lmtrain/tools/gpu_check.py`), not through lmtrain.tools, whose face imports torch: it has to start
where no usable torch is installed yet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import site
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__:  # imported as lmtrain.tools.gpu_check (the tests)
    from lmtrain.tools.gpu_report import PASSING, StepResult, write_report
else:  # run as a file: this folder leads sys.path, and lmtrain.tools's face, which imports torch, stays unread
    from gpu_report import PASSING, StepResult, write_report

ROOT = Path(__file__).resolve().parents[2]

# Seconds each step may take. A GPU machine's call is cut at 10 minutes; the whole check keeps to 8
# (TOTAL_LIMIT_S), the install of torch's CUDA wheel included (skipped when a CUDA torch is there).
# "probe": importing torch in each candidate Python. OVERHEAD_S: nvidia-smi, ending a step at its
# limit, starting each Python, the report.
STEP_LIMITS_S = {"probe": 15, "install": 100, "doctor": 25, "cuda_tests": 100, "bench": 110, "train": 120}
OVERHEAD_S = 10
TOTAL_LIMIT_S = 8 * 60

# ptb-medium (2 x 650 LSTM, vocab 10,000: 19.8 M parameters) takes 20 x 35 = 700 tokens a step, one
# epoch of PTB's 929,589 training tokens being 1,328 steps. A step is some 83 GFLOP, under 1 ms of an
# H100's arithmetic: it is bound by its ~350 kernel launches (35 time steps x 2 layers, forward and
# backward), about 5 ms replayed as a CUDA graph and up to 30 ms eager. So 2,000 steps (1.5 epochs, two
# validations) take 10-60 s, plus ~20 s to read and encode PTB and the compiles bench left uncached:
# inside STEP_LIMITS_S["train"].
TRAIN_STEPS = 2000

DEFAULT_TORCH_INDEX = "https://download.pytorch.org/whl/cu130"  # the CUDA build's index, when none is given
NO_GPU = 2  # exit code: no NVIDIA GPU here, or a bad option

# prints the torch of the Python it runs in, and which of lmtrain's needs it lacks (argv[1:])
PROBE = """\
import importlib.util, json, sys
found = {"torch": None, "cuda": None, "device": None, "missing": [n for n in sys.argv[1:] if not importlib.util.find_spec(n)]}
if importlib.util.find_spec("torch"):
    import torch
    found.update(torch=torch.__version__, cuda=torch.version.cuda)
    found["device"] = torch.cuda.get_device_name(0) if torch.version.cuda and torch.cuda.is_available() else None
print(json.dumps(found))
"""


@dataclass
class Step:
    name: str
    commands: list[list[str]]  # run in order under one time limit
    limit_s: float
    read: Callable[[str], dict] | None = None  # the step's figures, from its stdout
    judge: Callable[[dict], str] | None = None  # what is wrong in figures read from a step that ran, if anything
    env: dict[str, str] = field(default_factory=dict)
    missing_when: str | None = None  # a failure whose stderr says this is recorded as "missing"
    skip: str = ""  # why the step cannot run here, if it cannot


def find_gpus(smi: str = "nvidia-smi", device_files=("/dev/nvidia0", "/proc/driver/nvidia/gpus")) -> list[str]:
    """The machine's NVIDIA GPUs, judged without torch (the CPU venv's torch sees none even on a GPU
    machine): nvidia-smi's name, driver and memory of each, else each device file the driver made."""
    try:
        listed = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=5)
        if listed.returncode == 0 and listed.stdout.strip():
            return [line.strip() for line in listed.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return [f"a GPU at {p}" for p in device_files if os.path.exists(p) and not (os.path.isdir(p) and not os.listdir(p))]


def requirements() -> tuple[list[str], list[str]]:
    """pyproject.toml's requirements of lmtrain and its tests less torch and triton (the CUDA torch wheel
    brings its own triton), and the modules a Python must offer to run the steps: each one's name
    (the same as its import name), matplotlib left out (plots only)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    name = lambda requirement: re.split(r"[<>=!~;\[ ]", requirement)[0]  # noqa: E731
    needs = [r for r in project["dependencies"] + project["optional-dependencies"]["test"] if name(r) not in ("torch", "triton")]
    return needs, [name(r) for r in needs if name(r) != "matplotlib"]


def probe(python: str, limit_s: float) -> dict:
    """What `python` offers: {"torch", "cuda", "device", "missing"}, or {"error": why}."""
    try:
        done = subprocess.run([python, "-c", PROBE, *requirements()[1]], capture_output=True, text=True, timeout=limit_s)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        return {"error": (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def why_not(python: str, found: dict) -> str:
    if "error" in found:
        return f"{python}: {found['error']}"
    if found["torch"] is None:
        return f"{python}: no torch"
    if found["device"] is None:
        return f"{python}: torch {found['torch']} sees no GPU" + ("" if found["cuda"] else " (a CPU build)")
    return f"{python}: torch {found['torch']}, but no {', '.join(found['missing'])}"


def choose_python(candidates: list[str], deadline: float) -> tuple[str | None, dict, list[str]]:
    """The first candidate whose torch is a CUDA build that sees the GPU and which has lmtrain's
    needs; the notes say why each one before it would not do."""
    notes = []
    for python in candidates:
        if not Path(python).exists():
            continue
        found = probe(python, max(1.0, deadline - time.monotonic()))
        if found.get("device") is not None and not found.get("missing"):
            return python, found, notes
        notes.append(why_not(python, found))
    return None, {}, notes


def install_commands(venv: Path, version: str, index: str | None, wheels: Path | None) -> list[list[str]]:
    """pip's commands for torch==version from `wheels` (a folder, no registry) or `index`, then the
    rest of lmtrain's needs from the same place (or the registry, beside an index)."""
    python = str(venv / "bin" / "python")
    # no .pyc compiling (torch has thousands of files), and few retries where no registry answers
    pip = [python, "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check", "--retries", "1", "--timeout", "15"]
    source = ["--no-index", "--find-links", str(wheels)] if wheels else ["--index-url", index]
    rest = ["--no-index", "--find-links", str(wheels)] if wheels else []
    return [pip + source + [f"torch=={version}"], pip + rest + requirements()[0]]


def make_venv(venv: Path, limit_s: float) -> None:
    """A venv that sees this Python's packages behind its own: where no registry answers, typer, numpy
    and the rest come from the Python that runs the check, and only torch has to be installed.
    (`--system-site-packages` would not do: made from a venv's Python, it shows the base install's.)"""
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=limit_s)
    own = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True, timeout=limit_s).stdout.strip()
    Path(own, "lmtrain-gpu-check-base.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")


def run_step(step: Step, logs: Path) -> StepResult:
    """Run the step's commands in order within its time limit, stdout to logs/NAME.out and stderr to
    logs/NAME.err; every command runs, as each checks something of its own. Never raises."""
    if step.skip:
        return StepResult(step.name, "skipped", 0.0, step.limit_s, note=step.skip)
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{step.name}.out", logs / f"{step.name}.err"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    status, code, note = "ok", None, ""  # the first failure's: a later command's is a consequence, often
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        for command in step.commands:
            left, before = step.limit_s - (time.monotonic() - started), err_path.stat().st_size
            try:
                # a session of its own, so that a timeout ends the command's children (torch's compile workers) too
                process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
            except OSError as e:
                if status == "ok":
                    status, note = "failed", f"could not start {command[0]}: {e.strerror or e}"
                continue
            try:
                exit_code = process.wait(timeout=max(0.1, left))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # it may have ended since
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status, code, note = "timeout", None, f"stopped at its limit of {step.limit_s:.0f} s"
                break
            if status == "ok":
                code = exit_code
                if exit_code != 0:
                    status, note = "failed", last_line(err_path.read_bytes()[before:]) or f"exit code {exit_code}"
    result = StepResult(step.name, status, round(time.monotonic() - started, 1), step.limit_s, code, note,
                        commands=step.commands)
    if status == "failed" and step.missing_when and step.missing_when in err_path.read_text(errors="replace"):
        result.status, result.note = "missing", f"this lmtrain has no `{step.name}` command yet"
    if step.read is not None:
        try:
            result.figures = step.read(out_path.read_text(encoding="utf-8", errors="replace"))
        except Exception as e:  # a step's output is whatever it printed: a reader that trips only loses the figures
            if result.status == "ok":  # (a step that failed is expected to leave no figures)
                result.note = f"its output could not be read ({type(e).__name__}: {e})"
    wrong = step.judge(result.figures) if step.judge is not None and result.status == "ok" else ""
    if wrong:
        result.status, result.note = "failed", wrong
    return result


def last_line(text: bytes) -> str:
    lines = [line.strip() for line in text.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_steps(steps: list[Step], logs: Path, say=lambda message: None) -> list[StepResult]:
    results = []
    for step in steps:
        say(f"gpu-check: {step.name} (at most {step.limit_s:.0f} s)")
        results.append(run_step(step, logs))
        say(f"gpu-check: {step.name} {results[-1].status} in {results[-1].seconds:.1f} s {results[-1].note}".rstrip())
    return results


def read_pytest(text: str) -> dict:
    """The counts of pytest's closing lines ("3 passed, 1 skipped in 9.1s"), summed over its runs."""
    counts: dict[str, int] = {}
    for line in filter(lambda line: re.search(r" in [\d.]+s\b", line), text.splitlines()):
        for number, kind in re.findall(r"(\d+) (passed|failed|skipped|error|deselected)", line):  # "errors" too
            counts[kind] = counts.get(kind, 0) + int(number)
    return counts


def judge_cuda_tests(counts: dict) -> str:
    """On a GPU machine a `cuda` test that skips is one that saw no GPU: the step has failed."""
    if counts.get("skipped"):
        return f"{counts['skipped']} skipped on a GPU machine (logs/cuda_tests.out says why)"
    return "" if counts.get("passed") else "no test ran"


def read_training(run_dir: Path) -> dict:
    """valid perplexity at the last step, and tokens/s: the median of the logged intervals (the first
    holds the compiles) and over the last epoch's training (lmtrain.training.loop's records)."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = [json.loads(line) for line in (run_dir / "timing.jsonl").read_text().splitlines()]
    last, last_time = metrics[-1], timing[-1]
    intervals = [t["tokens_per_s"] for t in timing if t["kind"] == "train"]
    return {"steps": last["step"], "valid_ppl": last.get("valid_ppl"), "train_ppl": last.get("train_ppl"),
            "tokens_per_s": statistics.median(intervals) if intervals else None,
            "tokens_per_s_last_epoch": last_time["tokens_per_s"], "train_elapsed_s": last_time["elapsed_s"]}


def find_data(given: Path | None) -> Path | None:
    """The folder holding ptb/: DATA, else the reference copies beside or inside the checkout, else data/."""
    for folder in [given] if given else [ROOT.parent / "shared" / "data", ROOT / "shared" / "data", ROOT / "data"]:
        if (folder / "ptb" / "train.txt").is_file():
            return folder
    return None


def check_steps(python: str, out_dir: Path, data: Path | None, no_cuda: str = "") -> list[Step]:
    """doctor, the CUDA tests, issue 7's bench and the ptb-medium run, each under its limit; with
    `no_cuda` (why `python` has no CUDA torch) all but doctor are skipped."""
    lmtrain = [python, "-m", "lmtrain"]
    pytest = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    tests = [pytest + ["-m", "cuda", "tests"]]  # the tests marked `cuda` (skipped without a GPU)
    if (ROOT / "tests" / "test_triton_aot.py").is_file():
        tests.append(pytest + ["-m", "not cuda", "tests/test_triton_aot.py"])  # all of it, none twice
    run_dir = out_dir / "train-run"
    train = [lmtrain + ["train", str(data / "ptb") if data else "", "--config", "configs/ptb-medium.toml",
                        "--set", f"train.max_steps={TRAIN_STEPS}", "--set", "train.device=cuda",
                        "--run-dir", str(run_dir), "--force"]]
    return [
        Step("doctor", [lmtrain + ["doctor", "--json"]], STEP_LIMITS_S["doctor"],
             lambda out: {"report": json.loads(out)}, missing_when="No such command"),
        # the CPU references run their Python versions: building our C++ ops would take a minute of the budget
        Step("cuda_tests", tests, STEP_LIMITS_S["cuda_tests"], read_pytest, env={"LMTRAIN_COMPILE": "0"}, skip=no_cuda,
             judge=judge_cuda_tests),
        Step("bench", [lmtrain + ["bench", "--preset", "issue7", "--device", "cuda", "--json"]], STEP_LIMITS_S["bench"],
             lambda out: {"records": [json.loads(line) for line in out.splitlines() if line.startswith("{")]}, skip=no_cuda),
        Step("train", train, STEP_LIMITS_S["train"], lambda _: read_training(run_dir),
             skip=no_cuda or ("" if data else "no PTB here: give DATA=DIR, the folder holding ptb/train.txt")),
    ]


def prepare_python(venv: Path, cpu_venv: Path, version: str, index: str | None, wheels: Path | None,
                   logs: Path) -> tuple[str | None, dict, StepResult]:
    """The Python the steps run in, what its torch is, and the install step's result. Without a source
    (index, wheels) the first of .venv-gpu, the CPU venv and this Python with a CUDA torch that sees the
    GPU is taken as it is; failing that, or given a source and .venv-gpu lacks torch==version, torch
    is installed into .venv-gpu."""
    started = time.monotonic()
    probes_until = started + STEP_LIMITS_S["probe"]
    gpu_python = str(venv / "bin" / "python")
    candidates = [gpu_python] if index or wheels else [gpu_python, str(cpu_venv / "bin" / "python"), sys.executable]
    python, found, notes = choose_python(candidates, probes_until)
    if python and (not (index or wheels) or found["torch"].split("+")[0] == version):
        note = f"{python} has torch {found['torch']}" + ("" if found["torch"].startswith(version) else f", not the pinned {version}")
        return python, found, StepResult("install", "present", round(time.monotonic() - started, 1), STEP_LIMITS_S["install"], note=note)
    source = str(wheels) if wheels else index or DEFAULT_TORCH_INDEX
    begun = time.monotonic()  # the install's own clock: the venv, pip, and the probe after them
    try:
        make_venv(venv, STEP_LIMITS_S["install"] / 2)
    except (OSError, subprocess.SubprocessError) as e:
        return None, {}, StepResult("install", "failed", round(time.monotonic() - started, 1), STEP_LIMITS_S["install"],
                                    note=f"could not make {venv}: {e}")
    left = STEP_LIMITS_S["install"] - (time.monotonic() - begun)
    result = run_step(Step("install", install_commands(venv, version, None if wheels else source, wheels), left), logs)
    python, found, after = choose_python([gpu_python], max(probes_until, begun + STEP_LIMITS_S["install"]))
    result.seconds, result.limit_s = round(time.monotonic() - started, 1), STEP_LIMITS_S["install"]
    result.note = "; ".join(filter(None, [result.note, f"torch=={version} from {source}", *dict.fromkeys(notes + after)]))
    if result.status == "ok" and python is None:
        result.status = "failed"
    return python, found, result


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error lmtrain shows
        self.exit(NO_GPU, f"error: {message}\n")


def pinned_torch() -> str:
    """The Makefile's TORCH_VERSION: torch's version is pinned there alone."""
    return re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M).group(1)


def absolute(path: str) -> Path:  # the steps run in the checkout's root, wherever the check was started
    return Path(path).expanduser().resolve()


def parser() -> Parser:
    p = Parser(prog="make gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=absolute, help="the report's folder (default: runs/gpu-check-TIME)")
    p.add_argument("--data", type=absolute, help="the folder holding ptb/ (default: ../shared/data, shared/data or data)")
    p.add_argument("--torch-version", default=pinned_torch(), help="the torch to install (default: the Makefile's TORCH_VERSION)")
    p.add_argument("--torch-index", help="install the CUDA torch from this package index")
    p.add_argument("--torch-wheels", type=absolute, help="install it from the wheels in this folder (no registry)")
    p.add_argument("--venv", type=absolute, default=ROOT / ".venv-gpu", help="the venv a CUDA torch is installed into")
    p.add_argument("--cpu-venv", type=absolute, default=ROOT / ".venv", help="the CPU venv (used if its torch has CUDA)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    gpus = find_gpus()
    problem = ("no NVIDIA GPU on this machine (nvidia-smi lists none, no /dev/nvidia0): gpu-check needs one" if not gpus
               else "give TORCH_INDEX or TORCH_WHEELS, not both" if args.torch_index and args.torch_wheels
               else f"TORCH_WHEELS={args.torch_wheels} is not a folder" if args.torch_wheels and not args.torch_wheels.is_dir()
               else "")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return NO_GPU
    out_dir = args.out or ROOT / "runs" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    facts = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "gpus": gpus, "pinned_torch": args.torch_version}
    say(f"gpu-check: {gpus[0]}; report in {out_dir}")
    python, found, install = prepare_python(args.venv, args.cpu_venv, args.torch_version, args.torch_index,
                                            args.torch_wheels, out_dir / "logs")
    say(f"gpu-check: install {install.status} in {install.seconds:.1f} s: {install.note}")
    no_cuda = "" if python else f"no Python with a CUDA torch that sees the GPU (install: {install.status})"
    fallback = python or next((p for p in [str(args.venv / "bin" / "python"), sys.executable] if Path(p).exists()))
    facts.update(device=found.get("device"), torch=found.get("torch"), cuda=found.get("cuda"), python=python)
    results = [install, *run_steps(check_steps(fallback, out_dir, find_data(args.data), no_cuda), out_dir / "logs", say)]
    md_path, json_path = write_report(out_dir, {**facts, "limits_s": STEP_LIMITS_S}, results)
    print(f"gpu-check: {md_path} and {json_path}")
    return 0 if all(r.status in PASSING for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
