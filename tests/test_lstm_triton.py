"""The hand-written Triton LSTM step kernels (lmtrain.model.kernels.cuda.lstm_triton) under Triton's
interpreter on the CPU, against the LSTM cell's own step functions and, over a sequence, against
the engine. Skipped where triton is not installed (it is in the test extras)."""

import importlib
import sys

import pytest
import torch
from test_fused import fused_against_engine

from lmtrain.model.cells import lstm

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")


@pytest.fixture(scope="module")
def kernels():
    """lmtrain.model.kernels.cuda.lstm_triton imported with TRITON_INTERPRET=1 (read when the kernels are defined)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        import lmtrain.model.kernels.cuda.lstm_triton as module

        yield importlib.reload(module)
    # forget the interpreted kernels, so that a later import (on a GPU) compiles them
    sys.modules.pop("lmtrain.model.kernels.cuda.lstm_triton", None)
    delattr(sys.modules["lmtrain.model.kernels.cuda"], "lstm_triton")


def step_inputs(batch, hidden, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    wide = rand(batch, 6 * hidden)
    hg = wide[:, hidden : 5 * hidden]  # rows strided 6H apart, as a slice of a larger buffer can be
    return rand(batch, 4 * hidden) * 2, hg, (rand(batch, hidden), rand(batch, hidden))


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
@pytest.mark.parametrize("batch, hidden", [(3, 5), (7, 50)])  # 7 * 50 > BLOCK: several programs
def test_forward_step_matches_the_cell(kernels, batch, hidden, dtype, atol):
    xg, hg, state = step_inputs(batch, hidden, dtype)
    (h, c), (acts, tanh_c) = kernels.forward_step(xg, hg, state, ())
    (h_ref, c_ref), saved = lstm.forward_step(xg, hg, state, ())
    # the generated step saves i, f, g, o and tanh c' apart; the Triton one the four side by side
    acts_ref, tanh_ref = torch.cat(saved[:4], 1), saved[4]
    for ours, ref in [(h, h_ref), (c, c_ref), (acts, acts_ref), (tanh_c, tanh_ref)]:
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert (ours - ref).abs().max().item() <= atol


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
@pytest.mark.parametrize("batch, hidden", [(3, 5), (7, 50)])
def test_backward_step_matches_the_cell(kernels, batch, hidden, dtype, atol):
    xg, hg, state = step_inputs(batch, hidden, dtype)
    _, saved = lstm.forward_step(xg, hg, state, ())
    _, triton_saved = kernels.forward_step(xg, hg, state, ())
    g = torch.Generator().manual_seed(1)
    d_state = tuple(torch.randn(batch, hidden, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    dxg, dhg, (dh_direct, dc), d_extra = kernels.backward_step(d_state, triton_saved, state, ())
    dxg_ref, _, (_, dc_ref), _ = lstm.backward_step(d_state, saved, state, ())
    assert dhg is dxg and dh_direct is None and d_extra == ()
    assert (dxg - dxg_ref).abs().max().item() <= atol
    assert (dc - dc_ref).abs().max().item() <= atol


def test_sequence_through_the_triton_steps_matches_the_engine(kernels, monkeypatch):
    """The fused path with LMTRAIN_CUDA_POINTWISE=triton (interpreted on the CPU): outputs, final
    state and every gradient against Recurrence."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LMTRAIN_CUDA_POINTWISE", "triton")
    from lmtrain.model.kernels import fused

    assert fused.step_function(lstm, "forward", step_inputs(2, 3, torch.float64)[:2] + ((torch.zeros(2, 3),) * 2, ()),
                               mode="traced") is kernels.forward_step
    assert fused_against_engine(lstm, "traced", monkeypatch) <= 1e-12
