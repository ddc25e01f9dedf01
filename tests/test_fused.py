"""The fused sequence path (lmtrain.model.kernels.fused), run on the CPU: every cell against the engine's
per-step reference (Recurrence), in the traced mode (the functionalized graphs that torch.compile
gets, run without the compiler: fast), in the eager mode, and once compiled by inductor's C++
backend (the compiled step functions are cached for the whole session)."""

import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten
from helpers import needs_cuda
from test_cells import grads_of, layer_inputs, leaves

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model.cells import CELLS, get_cell, gru, lstm
from lmtrain.model.kernels import dispatch, fused
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.recurrence import Recurrence, run_layer

CELL_NAMES = [name for name, cell in CELLS.items() if dispatch.on_engine(cell)]  # the fused path is the engine's


def fused_against_engine(cell, mode, monkeypatch, dtype=torch.float64, compute_dtype=None, **sizes):
    """Largest absolute difference over outputs, final state and every gradient, fused (through
    run_layer, forced on the CPU) against Recurrence on the same inputs; `compute_dtype`: both in mixed precision."""
    monkeypatch.setenv("LMTRAIN_FUSED", "1")
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", mode)
    x, state, w_ih, w_hh, b_ih, b_hh, extra = layer_inputs(cell, **sizes)
    inputs = [t.detach().to(dtype).requires_grad_() for t in leaves(x, state, w_ih, w_hh, b_ih, b_hh, extra)]
    n = len(state)
    x, state, (w_ih, w_hh, b_ih), rest = inputs[0], tuple(inputs[1 : 1 + n]), inputs[1 + n : 4 + n], inputs[4 + n :]
    b_hh = rest[0] if cell.RECURRENT_BIAS else None
    extra = tuple(rest[1:] if cell.RECURRENT_BIAS else rest)
    y, final = run_layer(cell, x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype=compute_dtype)
    ref = Recurrence.apply(cell, n, compute_dtype, x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
    ours = (y, *final)
    assert len(ours) == len(ref)
    diffs = [(a - b).abs().max().item() for a, b in zip(ours, ref)]
    diffs += [(a - b).abs().max().item() for a, b in zip(grads_of(ours, inputs), grads_of(ref, inputs))]
    return max(diffs)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_traced_steps_match_the_engine(name, monkeypatch):
    assert fused_against_engine(CELLS[name], "traced", monkeypatch) <= 1e-12


@pytest.mark.parametrize("name", CELL_NAMES)
def test_eager_steps_match_the_engine(name, monkeypatch):
    assert fused_against_engine(CELLS[name], "eager", monkeypatch) <= 1e-12


@pytest.mark.parametrize("name", ["lstm", "gru", "slstm"])
def test_float32_matches_the_engine(name, monkeypatch):
    assert fused_against_engine(CELLS[name], "traced", monkeypatch, dtype=torch.float32, steps=9, batch=5, hidden=8) <= 1e-5


def test_compiled_lstm_matches_the_engine(monkeypatch):
    """The one test that runs inductor (C++ on the CPU; Triton is the same graph on CUDA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback to eager would pass otherwise
        assert fused_against_engine(lstm, "compile", monkeypatch) <= 1e-10


def test_steps_are_cached_per_shape(monkeypatch):
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", "traced")
    xg, hg = torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64)
    state = (torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    first = fused.step_function(lstm, "forward", (xg, hg, state, ()))
    assert fused.step_function(lstm, "forward", (xg + 1, hg, state, ())) is first
    wider = (torch.zeros(3, 8, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64))
    assert fused.step_function(lstm, "forward", (*wider, (torch.zeros(3, 2, dtype=torch.float64),) * 2, ())) is not first


def test_scratch_buffers_are_shared_by_layers_of_one_shape_and_gradients_stay_right(monkeypatch):
    """Two stacked layers of one size reuse the same scratch buffers one after the other; a whole
    model's loss and gradients equal those of the default path."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=6, hidden_size=6, cell="gru", dropout=0.0), vocab_size=17).double()
    tokens = torch.randint(0, 17, (5, 3))

    def loss_and_grads():
        model.zero_grad()
        logits, _ = model(tokens, model.init_state(3))
        loss = logits.logsumexp(-1).mean()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    loss_ref, grads_ref = loss_and_grads()
    monkeypatch.setenv("LMTRAIN_FUSED", "1")
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", "traced")
    fused.clear_caches()
    loss, grads = loss_and_grads()
    held = {key: buffer.data_ptr() for key, buffer in fused._SCRATCH.items()}
    assert {key[0] for key in held} >= {"xg", "hg", "dxg", "dhg"}
    loss_again, _ = loss_and_grads()
    assert {key: buffer.data_ptr() for key, buffer in fused._SCRATCH.items()} == held  # reused, not reallocated
    assert abs(loss - loss_ref) <= 1e-12 and loss_again == loss
    for ours, ref in zip(grads, grads_ref):
        assert (ours - ref).abs().max().item() <= 1e-12


def test_windows_of_several_lengths_share_one_scratch_buffer_per_name(monkeypatch):
    """Windows of 5, 9 and 7 steps hold one buffer per name (sized for 9, the others its leading
    rows), not one per length; every loss and gradient is bit-identical to a run that allocates
    fresh buffers for each window."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=6, hidden_size=6, cell="gru", dropout=0.0), vocab_size=17).double()
    monkeypatch.setenv("LMTRAIN_FUSED", "1")
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", "traced")
    windows = [torch.randint(0, 17, (steps, 3)) for steps in (5, 9, 7)]

    def run(fresh_buffers):
        fused._SCRATCH.clear()
        results = []
        for tokens in windows:
            if fresh_buffers:
                fused._SCRATCH.clear()
            model.zero_grad()
            logits, _ = model(tokens, model.init_state(3))
            logits.logsumexp(-1).mean().backward()
            results.append([logits.detach().clone()] + [p.grad.clone() for p in model.parameters()])
        return results

    reference = run(fresh_buffers=True)
    ours = run(fresh_buffers=False)
    names = [key[0] for key in fused._SCRATCH]
    assert sorted(names) == sorted(set(names)) and {"xg", "hg", "dxg", "dhg"} <= set(names)
    assert fused._SCRATCH["xg", (3, 18), torch.float64, torch.device("cpu")].shape == (9, 3, 18)
    for window, window_ref in zip(ours, reference):
        assert all(torch.equal(a, b) for a, b in zip(window, window_ref))


def test_a_step_that_cannot_be_compiled_runs_eagerly_with_a_warning(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused.torch, "compile", broken_compile)
    fused.clear_caches()
    with pytest.warns(RuntimeWarning, match="gru (forward|backward) step could not be compiled .*no compiler here.*running it eagerly"):
        assert fused_against_engine(gru, "compile", monkeypatch) <= 1e-12
    fused.clear_caches()


@pytest.mark.parametrize("variable, value", [("LMTRAIN_FUSED_MODE", "fast"), ("LMTRAIN_CUDA_POINTWISE", "cuda")])
def test_bad_selection_names_the_variable(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(LmtrainError, match=f"^{variable} must be one of .*, got '{value}'$"):
        fused.fused_mode() if variable == "LMTRAIN_FUSED_MODE" else fused.cuda_pointwise()


def test_cpu_takes_the_fused_path_only_when_asked(monkeypatch):
    monkeypatch.delenv("LMTRAIN_FUSED", raising=False)
    assert dispatch.explain(get_cell("peephole"), torch.device("cpu")).path in ("sequence", "engine")
    monkeypatch.setenv("LMTRAIN_FUSED", "1")
    assert dispatch.explain(get_cell("peephole"), torch.device("cpu")).path == "fused"


@needs_cuda("the fused path compiled to Triton kernels on a GPU")
@pytest.mark.parametrize("name", CELL_NAMES)
def test_cuda_matches_the_cpu_engine(name):
    cell = CELLS[name]
    x, state, w_ih, w_hh, b_ih, b_hh, extra = layer_inputs(cell, steps=9, batch=5, hidden=8)
    cpu = [t.detach().float().requires_grad_() for t in leaves(x, state, w_ih, w_hh, b_ih, b_hh, extra)]
    gpu = [t.detach().cuda().requires_grad_() for t in cpu]

    def run(inputs):
        n = len(state)
        xs, st, (wi, wh, bi), rest = inputs[0], tuple(inputs[1 : 1 + n]), inputs[1 + n : 4 + n], inputs[4 + n :]
        bh = rest[0] if cell.RECURRENT_BIAS else None
        ex = tuple(rest[1:] if cell.RECURRENT_BIAS else rest)
        y, final = run_layer(cell, xs, st, wi, wh, bi, bh, ex)
        return (y, *final)

    def weighted_grads(outputs, inputs):  # grads_of's weighting, drawn on the CPU for both devices
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outputs)
        return torch.autograd.grad(loss, inputs)

    ours, ref = run(gpu), run(cpu)
    for a, b in zip(ours, ref):
        assert (a.cpu() - b).abs().max().item() <= 1e-4
    for a, b in zip(weighted_grads(ours, gpu), weighted_grads(ref, cpu)):
        assert (a.cpu() - b).abs().max().item() <= 1e-4


def test_a_compiled_step_that_fails_mid_run_runs_eagerly_from_then_on():
    """A compiled step can fail on a later call (dynamo's recompile limit under fullgraph, say): the
    step warns once and returns the cell's own result, then and after, never raising mid-sequence.
    Here the failure is a traced graph called with shapes it was not traced for."""

    def step_args(batch, hidden, seed):
        g = torch.Generator().manual_seed(seed)
        r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
        return r(batch, 4 * hidden), r(batch, 4 * hidden), (r(batch, hidden), r(batch, hidden)), ()

    fn = fused.step_function(lstm, "forward", step_args(2, 3, 0), mode="traced")
    with pytest.warns(RuntimeWarning, match="compiled .*lstm forward step failed .*running it eagerly from now on"):
        out = fn(*step_args(4, 5, 1))
    for args in (step_args(4, 5, 1), step_args(2, 3, 2)):  # and eagerly after, whatever the shapes
        got = fn(*args) if args[0].size(0) == 2 else out
        want = lstm.forward_step(*args)
        assert all(torch.equal(a, b) for a, b in zip(tree_flatten(got)[0], tree_flatten(want)[0]))
