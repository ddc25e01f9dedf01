"""lmtrain.model.kernels.dispatch: the one place that chooses a layer's path, and says why."""

from __future__ import annotations

import pytest
import torch

from lmtrain.errors import LmtrainError
from lmtrain.model.cells import CELLS, get_cell
from lmtrain.model.kernels import dispatch
from lmtrain.model.recurrence import run_layer

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def default_switches(monkeypatch):
    for name in dispatch.SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_on_the_cpu_every_cell_takes_its_sequence_kernel():
    from lmtrain.model.kernels.build import cpu_ops

    compiled = cpu_ops() is not None  # the other cells' loops are C++ only; the LSTM's has a Python version
    for name in CELLS:
        if not dispatch.on_engine(get_cell(name)):  # its own layer, whatever the device
            assert dispatch.explain(get_cell(name), CPU) == dispatch.explain(get_cell(name), CPU, torch.bfloat16)
            assert dispatch.explain(get_cell(name), CPU).path == "own"
            continue
        choice = dispatch.explain(get_cell(name), CPU)
        if name == "lstm" or compiled:
            assert choice.path == "sequence" and f"{name}'s own sequence kernel" in choice.reason
        else:
            assert choice.path == "engine" and "does not take these tensors" in choice.reason
        from lmtrain.model.kernels.lstm import mixed_available

        bf16 = dispatch.explain(get_cell(name), CPU, torch.bfloat16).path  # our bfloat16 panels, where the CPU has them
        assert bf16 == ("sequence" if mixed_available(torch.empty(1)) else "engine")


def test_each_switch_changes_the_choice_and_the_reason(monkeypatch):
    lstm = get_cell("lstm")
    monkeypatch.setenv("LMTRAIN_KERNELS", "0")
    assert dispatch.explain(lstm, CPU) == dispatch.Choice("engine", "LMTRAIN_KERNELS=0 turns the sequence kernels off")
    monkeypatch.setenv("LMTRAIN_FUSED", "1")
    fused = dispatch.explain(lstm, CPU)
    assert fused.path == "fused" and "LMTRAIN_FUSED=1" in fused.reason and "pointwise steps: compile" in fused.reason
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", "traced")
    assert "pointwise steps: traced" in dispatch.explain(get_cell("gru"), CPU).reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LMTRAIN_PERSISTENT", "1")
    assert dispatch.explain(lstm, CPU).path == "persistent"
    assert dispatch.explain(get_cell("gru"), CPU).path == "fused"  # the persistent kernel is the LSTM's only


def test_a_cell_with_a_recurrent_bias_or_extras_falls_back(monkeypatch):
    lstm = get_cell("lstm")
    x, state = torch.zeros(3, 2, 8), (torch.zeros(2, 8), torch.zeros(2, 8))
    w, b = torch.zeros(32, 8), torch.zeros(32)
    assert dispatch.choose(lstm, x, state, w, w, b, None, (), compute_dtype=None).path == "sequence"
    assert dispatch.choose(lstm, x, state, w, w, b, torch.zeros(32), (), compute_dtype=None).path == "engine"


def test_a_switch_value_it_does_not_take_is_one_error(monkeypatch):
    monkeypatch.setenv("LMTRAIN_CUDA_POINTWISE", "cudnn")
    with pytest.raises(LmtrainError, match="^LMTRAIN_CUDA_POINTWISE must be one of compile, triton, got 'cudnn'$"):
        dispatch.switch("LMTRAIN_CUDA_POINTWISE")


def test_run_layer_runs_what_dispatch_chose(monkeypatch):
    """The engine's entry point asks dispatch: with the LSTM's kernel refused, the engine runs."""
    lstm = get_cell("lstm")
    monkeypatch.setenv("LMTRAIN_SELF_CHECK", "0")  # counts the kernel's calls: no check's call among them
    calls = []
    real = lstm.sequence_kernel.run
    monkeypatch.setattr(lstm.sequence_kernel, "run", lambda *a: calls.append("sequence") or real(*a))
    torch.manual_seed(0)
    x, state = torch.randn(3, 2, 8), (torch.zeros(2, 8), torch.zeros(2, 8))
    w_ih, w_hh, b = torch.randn(32, 8), torch.randn(32, 8), torch.randn(32)
    fast, _ = run_layer(lstm, x, state, w_ih, w_hh, b)
    monkeypatch.setenv("LMTRAIN_KERNELS", "0")
    slow, _ = run_layer(lstm, x, state, w_ih, w_hh, b)
    assert calls == ["sequence"] and torch.allclose(fast, slow, atol=1e-6)


def test_every_switch_is_documented_with_its_default():
    for name, (default, _, meaning) in dispatch.SWITCHES.items():
        assert f"{name}" in dispatch.__doc__ and f"(default {default})" in dispatch.__doc__ and meaning
