"""`lmtrain doctor`: what this machine offers and what lmtrain does with it, for bug reports.

    report = diagnose(devices)     versions, CPU, CUDA, Triton, the C++ ops' build, and for each
                                   device x cell x precision the path the dispatcher picks, whether
                                   its self-check passed (lmtrain.model.kernels.selfcheck), what
                                   runs in the end, and one forward + backward window's time
                                   (a cell of its own layer: path "own", its layer's window; two
                                   layers, one on the other, where a layer hands its cells up: dglstm)
    render(report) -> str          the same as text
    exit_code(report)              0: every fast path passed its check; 1: something fell back

Every check runs even with LMTRAIN_SELF_CHECK=0: that is the point of the command.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from lmtrain import __version__
from lmtrain.config import ModelConfig
from lmtrain.model import (CELLS, LanguageModel, build, cross_entropy, dispatch, explain, get_cell, layer_class, run_layer,
                           selfcheck, stack_forward)

# the CPU features lmtrain's kernels look for: /proc/cpuinfo's flag -> what it gives
CPU_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX512-BF16 (bf16 products)",
    "avx512_vnni": "VNNI (int8 generation)",
    "amx_bf16": "AMX-BF16",
}
WINDOW = dict(steps=20, batch=8, inputs=64, hidden=64)  # the timed window: small, so the command is quick
TIMED_RUNS = 3  # after one untimed run (which checks and compiles)
COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class PathReport:
    device: str
    cell: str
    precision: str
    chosen: str  # the path dispatch picks first
    reason: str
    runs: str  # the path that runs after the self-checks
    check: str  # "passed", "not needed" (the engine is the reference; an own layer is held to its own by tests) or "failed: why"
    ms: float | None  # one forward + backward window of WINDOW's size, median of TIMED_RUNS
    error: str | None = None  # when even the engine failed


def devices_available() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cpu_report() -> dict:
    flags = set(build.cpu_features().partition(": ")[2].split())  # what the C++ build key holds too
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"model": model, "architecture": platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "features": {name: name in flags for name in CPU_FEATURES}}


def cuda_report() -> dict:
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                            "capability": f"{p.major}.{p.minor}"})
    return {"available": torch.cuda.is_available(), "cuda_version": torch.version.cuda, "devices": devices}


def triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001  missing, or broken on this machine: either way not usable
        return None
    return triton.__version__


def extension_report() -> dict:
    """The C++ ops: off (LMTRAIN_COMPILE=0), loaded, or failed with the builder's reason."""
    try:
        directory = str(build.build_directory())
    except Exception as error:  # noqa: BLE001  torch's extension machinery itself is broken
        directory = f"unknown ({type(error).__name__})"
    if not dispatch.on("LMTRAIN_COMPILE"):
        return {"status": "off", "detail": "LMTRAIN_COMPILE=0", "cache": directory}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = build.cpu_ops()
    if ops is not None:
        return {"status": "loaded", "detail": "", "cache": directory}
    detail = next((str(w.message) for w in caught if "compiled kernels" in str(w.message)), "not loaded")
    return {"status": "failed", "detail": detail, "cache": directory}


def window(cell, device: torch.device, seed: int = 0) -> tuple:
    """A layer's call of WINDOW's size on `device`: leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    steps, batch, inputs, hidden = WINDOW["steps"], WINDOW["batch"], WINDOW["inputs"], WINDOW["hidden"]
    gates = cell.GATES * hidden

    def leaf(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    b_hh = leaf(gates, scale=0.1) if cell.RECURRENT_BIAS else None
    extra = tuple(leaf(blocks * hidden, scale=0.1) for blocks in cell.EXTRA.values())
    state = tuple(leaf(batch, hidden, scale=0.1) for _ in cell.STATE)
    return leaf(steps, batch, inputs, scale=1.0), state, leaf(gates, inputs), leaf(gates, hidden), leaf(gates, scale=0.1), b_hh, extra


def fwd_bwd(cell, args: tuple, compute_dtype) -> None:
    x, state, w_ih, w_hh, b_ih, b_hh, extra = args
    y, final = run_layer(cell, x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype=compute_dtype)
    (y.square().mean() + sum(s.mean() for s in final)).backward()


def timed_ms(run, device: torch.device) -> float:
    times = []
    for _ in range(TIMED_RUNS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def own_layer_window(cell, device: torch.device, compute_dtype, seed: int = 0):
    """A cell of its own layer (not on the engine, dispatch.on_engine): its layer at the config's
    defaults and WINDOW's size -> a forward + backward of it. A layer that hands a sequence up the
    stack (passes_up: dglstm, whose layer above reads its cells) runs with a second layer on it,
    built on this cell (below), so that what a layer takes from the one below is in the time."""
    g = torch.Generator().manual_seed(seed)
    Layer, config = layer_class(cell), ModelConfig()
    layers = [Layer(cell, WINDOW["inputs"], WINDOW["hidden"], config)]
    if Layer.passes_up:
        layers.append(Layer(cell, WINDOW["hidden"], WINDOW["hidden"], config, below=cell))
    for p in (p for layer in layers for p in layer.parameters()):
        torch.nn.init.uniform_(p, -0.3, 0.3, generator=g)
    for layer in layers:
        layer.to(device)
    x = torch.randn(WINDOW["steps"], WINDOW["batch"], WINDOW["inputs"], generator=g).to(device).requires_grad_()

    def run():
        y, up, loss = x, None, 0.0
        for layer in layers:
            y, final, up = stack_forward(layer, y, layer.init_state(WINDOW["batch"], x), up, compute_dtype=compute_dtype)
            loss = loss + sum(s.mean() for s in final)
        (loss + y.square().mean()).backward()

    return run


def path_report(device_name: str, cell_name: str, precision: str) -> PathReport:
    device, cell, compute_dtype = torch.device(device_name), get_cell(cell_name), COMPUTE_DTYPES[precision]
    first = explain(cell, device, compute_dtype)
    if dispatch.on_engine(cell):
        args = window(cell, device)
        run = lambda: fwd_bwd(cell, args, compute_dtype)  # noqa: E731
    else:
        run = own_layer_window(cell, device, compute_dtype)
    try:
        run()  # checks (and compiles) on first use
        ms = timed_ms(run, device)
        error = None
    except Exception as e:  # noqa: BLE001  even the engine failed: report it, do not stop the report
        ms, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    now = explain(cell, device, compute_dtype)
    failed = selfcheck.failures()
    check = "not needed" if first.path in ("engine", "own") else f"failed: {failed[first.path]}" if first.path in failed else "passed"
    return PathReport(device_name, cell_name, precision, first.path, first.reason, now.path, check, ms, error)


def side_paths() -> dict[str, str]:
    """The CPU's other checked paths, run once on small inputs: the fused cross-entropy and
    generation's whole-step op -> "passed", "failed: why" or "not offered"."""
    from lmtrain.generation import Stepper

    results = {}
    logits, targets = torch.randn(16, 50, requires_grad=True), torch.randint(0, 50, (16,))
    cross_entropy(logits, targets).sum().backward()
    torch.manual_seed(0)
    stepper = Stepper(LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=24), 50).eval())
    for path, offered in (("cross-entropy", build.cpu_ops() is not None), ("step-op", stepper.stack is not None)):
        off = selfcheck.failures()
        results[path] = f"failed: {off[path]}" if path in off else "passed" if offered else "not offered"
    return results


def diagnose(devices: list[str] | None = None) -> dict:
    """Everything `lmtrain doctor` reports, as plain data (its --json)."""
    devices = devices or devices_available()
    kept = os.environ.get("LMTRAIN_SELF_CHECK")
    os.environ["LMTRAIN_SELF_CHECK"] = "1"
    try:
        paths = [path_report(d, c, p) for d in devices for c in CELLS for p in COMPUTE_DTYPES]
        others = side_paths() if "cpu" in devices else {}
    finally:
        if kept is None:
            os.environ.pop("LMTRAIN_SELF_CHECK", None)
        else:
            os.environ["LMTRAIN_SELF_CHECK"] = kept
    fell_back = selfcheck.failures()
    return {
        "lmtrain": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "cpu": cpu_report(), "cuda": cuda_report(), "triton": triton_version(),
        "extension": extension_report(), "window": WINDOW, "paths": [asdict(p) for p in paths], "other_paths": others,
        "fell_back": fell_back, "status": "fell back" if fell_back or any(p.error for p in paths) else "ok",
    }


def exit_code(report: dict) -> int:
    return 0 if report["status"] == "ok" else 1


def render(report: dict) -> str:
    cpu, cuda, ext = report["cpu"], report["cuda"], report["extension"]
    features = ", ".join(CPU_FEATURES[name] for name, has in cpu["features"].items() if has) or "none of note"
    lines = [
        f"lmtrain {report['lmtrain']}, Python {report['python']}, torch {report['torch']}, {report['platform']}",
        f"CPU: {cpu['model']} ({cpu['architecture']}), {cpu['cores']} cores, torch uses {cpu['torch_threads']} threads",
        f"  features: {features}",
        "CUDA: " + ("; ".join(f"{d['name']} ({d['memory_gib']} GiB, sm {d['capability']})" for d in cuda["devices"])
                    + f", CUDA {cuda['cuda_version']}" if cuda["available"] else "no device"),
        f"Triton: {report['triton'] or 'not installed'}",
        f"C++ ops: {ext['status']}{' (' + ext['detail'] + ')' if ext['detail'] else ''}; cache {ext['cache']}",
        "",
        f"Paths (one forward + backward window: T={WINDOW['steps']}, B={WINDOW['batch']}, "
        f"{WINDOW['inputs']} -> {WINDOW['hidden']} units):",
        f"  {'device':6} {'cell':9} {'prec':5} {'chosen':11} {'check':11} {'runs':11} {'ms':>8}",
    ]
    for p in report["paths"]:
        check = "passed" if p["check"] == "passed" else "-" if p["check"] == "not needed" else "FAILED"
        ms = f"{p['ms']:8.2f}" if p["ms"] is not None else "   error"
        lines.append(f"  {p['device']:6} {p['cell']:9} {p['precision']:5} {p['chosen']:11} {check:11} {p['runs']:11} {ms}")
    for name, result in report["other_paths"].items():
        lines.append(f"  {name}: {result}")
    lines.append("")
    for p in report["paths"]:
        if p["error"]:
            lines.append(f"error: {p['device']} {p['cell']} {p['precision']}: {p['error']}")
    for path, why in report["fell_back"].items():
        lines.append(f"fell back: the {path} path is off: {why}")
    lines.append("status: " + ("ok, every fast path passed its check" if report["status"] == "ok"
                               else "something fell back (above); lmtrain still runs, on the next path down"))
    return "\n".join(lines)
