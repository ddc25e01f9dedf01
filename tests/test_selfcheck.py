"""Fast paths that check themselves (lmtrain.model.kernels.selfcheck): every path's injected failure
(LMTRAIN_FAULT) is caught, reported in one line, and what runs equals a run with that path off."""

from __future__ import annotations

import pytest
import torch
from test_determinism import run_once
from helpers import write_small_corpus

from lmtrain.errors import LmtrainError
from lmtrain.generation.sampler import SampleSettings, sample
from lmtrain.model import selfcheck
from lmtrain.model.cells import CELLS
from lmtrain.model.kernels import build, dispatch
from lmtrain.model.kernels.cross_entropy import cross_entropy
from lmtrain.model.language_model import LanguageModel
from lmtrain.config import ModelConfig
from lmtrain.model.recurrence import run_layer

lstm = CELLS["lstm"]

# each layer path and the switches that make dispatch pick it on the CPU
LAYER_PATHS = {
    "sequence": {},
    "fused": {"LMTRAIN_FUSED": "1", "LMTRAIN_FUSED_MODE": "traced"},
    "triton": {"LMTRAIN_FUSED": "1", "TRITON_INTERPRET": "1", "LMTRAIN_CUDA_POINTWISE": "triton"},
    "persistent": {"LMTRAIN_FUSED": "1", "TRITON_INTERPRET": "1", "LMTRAIN_PERSISTENT": "1"},
}


def layer_inputs(cell=lstm, steps=6, batch=3, inputs=5, hidden=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = cell.GATES * hidden
    x = torch.randn(steps, batch, inputs, generator=g)
    state = tuple(torch.randn(batch, hidden, generator=g) * 0.1 for _ in cell.STATE)
    w_ih, w_hh = torch.randn(gates, inputs, generator=g) * 0.3, torch.randn(gates, hidden, generator=g) * 0.3
    return x, state, w_ih, w_hh, torch.randn(gates, generator=g) * 0.1


def outputs_and_grads(cell=lstm, compute_dtype=None):
    """run_layer's output, final state and every gradient, on fresh leaves."""
    x, state, w_ih, w_hh, b = [t.requires_grad_() if isinstance(t, torch.Tensor) else t for t in layer_inputs(cell)]
    state = tuple(s.requires_grad_() for s in state)
    y, final = run_layer(cell, x, state, w_ih, w_hh, b, compute_dtype=compute_dtype)
    (y.square().sum() + sum(s.sum() for s in final)).backward()
    return [y.detach(), *(s.detach() for s in final), x.grad, *(s.grad for s in state), w_ih.grad, w_hh.grad, b.grad]


def on_path(monkeypatch, path):
    if path in ("triton", "persistent"):
        pytest.importorskip("triton")
    for name, value in LAYER_PATHS[path].items():
        monkeypatch.setenv(name, value)


def test_the_switches_name_known_paths_and_faults(monkeypatch):
    monkeypatch.setenv("LMTRAIN_FAULT", "sequence, fused:wrong")
    assert selfcheck.names("LMTRAIN_FAULT") == {"sequence": "raise", "fused": "wrong"}
    monkeypatch.setenv("LMTRAIN_FAULT", "sequnce")
    with pytest.raises(LmtrainError, match="LMTRAIN_FAULT: unknown path 'sequnce' \\(known: persistent, triton"):
        selfcheck.names("LMTRAIN_FAULT")
    monkeypatch.setenv("LMTRAIN_DISABLE", "fused:sometimes")
    with pytest.raises(LmtrainError, match="a fault is raise or wrong"):
        selfcheck.names("LMTRAIN_DISABLE")


def test_a_passing_path_is_checked_once_per_kind_of_call(monkeypatch):
    calls = []
    real = lstm.sequence_kernel.run
    monkeypatch.setattr(lstm.sequence_kernel, "run", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x, state, w_ih, w_hh, b = layer_inputs()
    run_layer(lstm, x, state, w_ih, w_hh, b)
    run_layer(lstm, x[:4], state, w_ih, w_hh, b)  # another window length: the same kind of call
    assert calls == [selfcheck.CHECK_STEPS, 6, 4]
    run_layer(lstm, x[:, :2], tuple(s[:2] for s in state), w_ih, w_hh, b)  # another batch: checked again
    assert calls[3:] == [selfcheck.CHECK_STEPS, 6] and selfcheck.turned_off() == {}


@pytest.mark.parametrize("fault", ["raise", "wrong"])
@pytest.mark.parametrize("path", list(LAYER_PATHS))
def test_a_failing_layer_path_falls_back_to_what_runs_with_it_off(path, fault, monkeypatch, capfd):
    on_path(monkeypatch, path)
    assert dispatch.explain(lstm, torch.device("cpu")).path == path
    monkeypatch.setenv("LMTRAIN_DISABLE", path)
    off = outputs_and_grads()
    monkeypatch.delenv("LMTRAIN_DISABLE")
    selfcheck.reset()
    capfd.readouterr()
    monkeypatch.setenv("LMTRAIN_FAULT", f"{path}:{fault}")
    caught = outputs_and_grads()
    for a, b in zip(caught, off, strict=True):
        assert torch.equal(a, b)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: lmtrain's {path} path is off for this process: ")
    assert ("raised InjectedFault" if fault == "raise" else "differs from the reference by 0.5") in lines[0]
    assert path in selfcheck.turned_off()
    assert dispatch.explain(lstm, torch.device("cpu")).path != path  # and it stays off


def test_a_path_that_raises_after_its_check_falls_back_too(monkeypatch, capfd):
    x, state, w_ih, w_hh, b = layer_inputs()
    run_layer(lstm, x, state, w_ih, w_hh, b)  # checked and passed
    monkeypatch.setenv("LMTRAIN_FAULT", "sequence")
    y, _ = run_layer(lstm, x, state, w_ih, w_hh, b)
    monkeypatch.setenv("LMTRAIN_FAULT", "")
    monkeypatch.setenv("LMTRAIN_DISABLE", "sequence")
    assert torch.equal(y, run_layer(lstm, x, state, w_ih, w_hh, b)[0])
    assert "sequence path is off for this process: it raised InjectedFault" in capfd.readouterr().err


def test_without_checks_a_raising_path_still_falls_back(monkeypatch):
    monkeypatch.setenv("LMTRAIN_SELF_CHECK", "0")
    monkeypatch.setenv("LMTRAIN_FAULT", "sequence")
    x, state, w_ih, w_hh, b = layer_inputs()
    y, _ = run_layer(lstm, x, state, w_ih, w_hh, b)
    assert "sequence" in selfcheck.turned_off() and torch.isfinite(y).all()


def test_an_input_both_paths_refuse_is_the_callers_error_not_the_paths():
    if build.cpu_ops() is None:
        pytest.skip("needs the compiled ops")
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        cross_entropy(torch.zeros(2, 5), torch.tensor([1, 5]))
    assert selfcheck.turned_off() == {}


@pytest.mark.parametrize("fault", ["raise", "wrong"])
def test_a_failing_cross_entropy_falls_back_to_torchs(fault, monkeypatch, capfd):
    if build.cpu_ops() is None:
        pytest.skip("needs the compiled ops")
    logits = torch.randn(20, 30, requires_grad=True)
    targets = torch.randint(-1, 30, (20,))
    monkeypatch.setenv("LMTRAIN_FAULT", f"cross-entropy:{fault}")
    losses = cross_entropy(logits, targets)
    losses.sum().backward()
    want = torch.nn.functional.cross_entropy(logits.detach().float(), targets, ignore_index=-1, reduction="none")
    assert torch.equal(losses.detach(), want)
    assert "warning: lmtrain's cross-entropy path is off for this process" in capfd.readouterr().err


@pytest.mark.parametrize("fault", ["raise", "wrong"])
def test_a_failing_whole_step_op_falls_back_to_the_op_by_op_step(fault, monkeypatch, capfd):
    if build.cpu_ops() is None:
        pytest.skip("needs the compiled ops")
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=24), 40).eval()
    settings = SampleSettings(30, num_samples=2, seed=3)
    monkeypatch.setenv("LMTRAIN_DISABLE", "step-op")
    off = torch.stack(list(sample(model, [3, 4], settings)))
    monkeypatch.delenv("LMTRAIN_DISABLE")
    selfcheck.reset()
    monkeypatch.setenv("LMTRAIN_FAULT", f"step-op:{fault}")
    caught = torch.stack(list(sample(model, [3, 4], settings)))
    assert torch.equal(caught, off)
    assert "warning: lmtrain's step-op path is off for this process" in capfd.readouterr().err


def test_a_failing_build_leaves_the_python_loops(monkeypatch):
    if not dispatch.on("LMTRAIN_COMPILE"):
        pytest.skip("LMTRAIN_COMPILE=0: nothing is built")
    build._load_cpu_ops.cache_clear()
    monkeypatch.setenv("LMTRAIN_FAULT", "build")
    try:
        with pytest.warns(UserWarning, match="compiled kernels unavailable.*fault injected into the build path"):
            assert build.cpu_ops() is None
    finally:
        build._load_cpu_ops.cache_clear()


@pytest.mark.parametrize("path", ["sequence", "cross-entropy", "fused"])
def test_a_training_run_with_a_failing_path_equals_one_with_it_off(path, tmp_path, monkeypatch):
    """The check runs before the path's first real use and draws no random numbers, so the
    run's metrics.jsonl is byte for byte that of a run with the path off from the start."""
    if build.cpu_ops() is None and path != "fused":
        pytest.skip("needs the compiled ops")
    if path == "fused":
        on_path(monkeypatch, "fused")
    corpus = write_small_corpus(tmp_path / "corpus")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("LMTRAIN_DISABLE", path)
        off = run_once(corpus, tmp_path / "off", monkeypatch, extra=("train.epochs=2",))
        monkeypatch.delenv("LMTRAIN_DISABLE")
        selfcheck.reset()
        monkeypatch.setenv("LMTRAIN_FAULT", f"{path}:wrong")
        caught = run_once(corpus, tmp_path / "caught", monkeypatch, extra=("train.epochs=2",))
        assert path in selfcheck.turned_off()
        selfcheck.reset()
        monkeypatch.delenv("LMTRAIN_FAULT")
        run_once(corpus, tmp_path / "fast", monkeypatch, extra=("train.epochs=2",))
        assert path in selfcheck.passed()  # without the fault the path passed its check and ran
    finally:
        torch.set_num_threads(threads)
    assert caught == off
