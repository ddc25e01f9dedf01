"""The persistent LSTM kernel (lmtrain.model.kernels.cuda.lstm_persistent) under Triton's interpreter on the
CPU: the whole window's forward and backward in one launch each, against the engine (Recurrence)
in float32 and in mixed precision, directly and through run_layer's fused path."""

import importlib
import sys

import pytest
import torch
from test_cells import grads_of, layer_inputs, leaves

from lmtrain.model.cells import lstm
from lmtrain.model.recurrence import Recurrence, run_layer

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")


@pytest.fixture(scope="module")
def persistent():
    """lmtrain.model.kernels.cuda.lstm_persistent imported with TRITON_INTERPRET=1 (read when kernels are defined)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        import lmtrain.model.kernels.cuda.lstm_triton as pointwise

        importlib.reload(pointwise)
        import lmtrain.model.kernels.cuda.lstm_persistent as module

        yield importlib.reload(module)
    for name in ("lstm_persistent", "lstm_triton"):  # a later import (on a GPU) compiles them afresh
        sys.modules.pop(f"lmtrain.model.kernels.cuda.{name}", None)
        delattr(sys.modules["lmtrain.model.kernels.cuda"], name)


def inputs(steps, batch, input_size, hidden):
    x, state, w_ih, w_hh, b_ih, _, _ = layer_inputs(lstm, steps=steps, batch=batch, input_size=input_size, hidden=hidden, seed=2)
    tensors = [t.detach().float().requires_grad_() for t in leaves(x, state, w_ih, w_hh, b_ih, None, ())]
    return tensors


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("compute_dtype, tol", [(None, 1e-5), (torch.bfloat16, 1e-4)])
@pytest.mark.parametrize("sizes", [(4, 3, 5, 7),  # one program, partial tiles
                                   (5, 19, 6, 40)])  # two programs (19 > 16 streams), two unit tiles
def test_window_matches_the_engine(persistent, sizes, compute_dtype, tol):
    tensors = inputs(*sizes)
    x, h0, c0, w_ih, w_hh, b = tensors
    ours = persistent.PersistentLSTM.apply(compute_dtype, x, h0, c0, w_ih, w_hh, b)
    ref = Recurrence.apply(lstm, 2, compute_dtype, x, w_ih, w_hh, b, None, h0, c0)
    for a, r in zip([*ours, *grads_of(ours, tensors)], [*ref, *grads_of(ref, tensors)]):
        assert a.dtype == torch.float32 and a.shape == r.shape
        assert relative(a, r) <= tol


def test_fused_path_takes_it_when_asked(persistent, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LMTRAIN_FUSED", "1")
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", "eager")
    monkeypatch.setenv("LMTRAIN_SELF_CHECK", "0")  # counts the kernel's calls: no check's call among them
    x, h0, c0, w_ih, w_hh, b = inputs(3, 2, 4, 5)
    calls = []
    real = persistent.PersistentLSTM.apply
    monkeypatch.setattr(persistent.PersistentLSTM, "apply", lambda *a: calls.append(a[0]) or real(*a))
    plain, _ = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    monkeypatch.setenv("LMTRAIN_PERSISTENT", "1")
    y, _ = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b, compute_dtype=torch.bfloat16)
    y32, _ = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    assert calls == [torch.bfloat16, None]
    assert relative(y32, plain) <= 1e-5 and 0 < relative(y, plain) <= 2e-2
