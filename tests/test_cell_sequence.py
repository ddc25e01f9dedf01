"""The C++ time loops of the cells other than the LSTM (lmtrain/model/kernels/cell_sequence.py,
cpu/cell_cpu.cpp) against each cell's plain-autograd reference and the generic engine: outputs,
final state and every gradient, float64 to 1e-10, float32 (our panels) to 1e-5, and gradcheck."""

from __future__ import annotations

import pytest
import torch

from lmtrain.model.cells import CELLS
from lmtrain.model.kernels import dispatch
from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.kernels.cell_sequence import CellSequence, generated_programs
from lmtrain.model.recurrence import Recurrence

pytestmark = pytest.mark.skipif(cpu_ops() is None, reason="the loops are compiled C++ (LMTRAIN_COMPILE=0, or no compiler)")
NAMES = sorted(generated_programs())


def inputs(cell, dtype, steps=9, batch=5, input_size=6, hidden=7, seed=0):
    """A layer's call: x, state, w_ih, w_hh, b_ih, b_hh, extra, all leaves; the sLSTM's normaliser
    positive, as every state it reaches is."""
    g = torch.Generator().manual_seed(seed)
    gates = cell.GATES * hidden
    r = lambda *shape, scale=0.4: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    state = [r(batch, hidden) for _ in cell.STATE]
    if len(state) == 4:  # h, c, n, m
        state[2] = (state[2].detach().abs() + 0.5).requires_grad_()
    b_hh = r(gates) if cell.RECURRENT_BIAS else None
    extra = tuple(r(blocks * hidden) for blocks in cell.EXTRA.values())
    return r(steps, batch, input_size, scale=1.0), tuple(state), r(gates, input_size), r(gates, hidden), r(gates), b_hh, extra


def outputs_and_grads(run, x, state, w_ih, w_hh, b_ih, b_hh, extra):
    y, final = run(x, state, w_ih, w_hh, b_ih, b_hh, extra)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + sum((s * 1.7).sum() for s in final)
    leaves = [t for t in (x, *state, w_ih, w_hh, b_ih, b_hh, *extra) if t is not None]
    return [y, *final, *torch.autograd.grad(loss, leaves)]


def ours(name):
    def run(x, state, w_ih, w_hh, b_ih, b_hh, extra):
        out = CellSequence.apply(name, len(state), x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
        return out[0], tuple(out[1:])
    return run


def engine(cell):
    def run(x, state, w_ih, w_hh, b_ih, b_hh, extra):
        out = Recurrence.apply(cell, len(state), None, x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
        return out[0], tuple(out[1:])
    return run


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", NAMES)
def test_the_loop_computes_what_the_reference_and_the_engine_compute(name, dtype, tol):
    cell = CELLS[name]
    args = inputs(cell, dtype)
    got = outputs_and_grads(ours(name), *args)
    for want in (outputs_and_grads(cell.reference, *args), outputs_and_grads(engine(cell), *args)):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == dtype and (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    cell = CELLS[name]
    x, state, w_ih, w_hh, b_ih, b_hh, extra = inputs(cell, torch.float64, steps=4, batch=2, input_size=3, hidden=3)
    n = len(state)

    def run(x, w_ih, w_hh, b_ih, *rest):
        b_hh, rest = (rest[0], rest[1:]) if cell.RECURRENT_BIAS else (None, rest)
        return CellSequence.apply(name, n, x, w_ih, w_hh, b_ih, b_hh, *rest)

    leaves = [t for t in (x, w_ih, w_hh, b_ih, b_hh, *state, *extra) if t is not None]
    assert torch.autograd.gradcheck(run, leaves)


@pytest.mark.parametrize("name", NAMES)
def test_dispatch_takes_the_loop_in_float32(name):
    assert dispatch.explain(CELLS[name], torch.device("cpu")).path == "sequence"


def test_windows_of_several_lengths_and_batches_in_turn():
    """No state kept between calls: each call's numbers are those of a fresh one."""
    cell = CELLS["gru"]
    for steps, batch in ((3, 2), (11, 6), (1, 1), (3, 2)):
        args = inputs(cell, torch.float64, steps=steps, batch=batch, seed=steps)
        for a, b in zip(outputs_and_grads(ours("gru"), *args), outputs_and_grads(cell.reference, *args)):
            assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("name", NAMES)
def test_mixed_precision_is_the_engines_mixed_precision(name):
    """MixedCellSequence (bfloat16 operands, float32 sums, AVX512-BF16) against the engine with
    compute_dtype bfloat16 (the same roundings, sums in another order) and near float32."""
    from lmtrain.model.kernels.cell_sequence import MixedCellSequence
    from lmtrain.model.kernels.lstm import mixed_available

    if not mixed_available(torch.empty(1)):
        pytest.skip("needs AVX512-BF16 and the compiled kernels")
    cell = CELLS[name]
    args = inputs(cell, torch.float32)

    def mixed(x, state, w_ih, w_hh, b_ih, b_hh, extra):
        out = MixedCellSequence.apply(name, len(state), x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
        return out[0], tuple(out[1:])

    def engine_bf16(x, state, w_ih, w_hh, b_ih, b_hh, extra):
        out = Recurrence.apply(cell, len(state), torch.bfloat16, x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
        return out[0], tuple(out[1:])

    got = outputs_and_grads(mixed, *args)
    for want, tol in ((outputs_and_grads(engine_bf16, *args), 2e-3), (outputs_and_grads(engine(cell), *args), 5e-2)):
        for a, b in zip(got, want, strict=True):
            assert a.dtype == torch.float32 and (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())
    assert dispatch.explain(cell, torch.device("cpu"), torch.bfloat16).path == "sequence"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_generation_step_op_is_the_cells_step(name, dtype, tol):
    """step_ops.cell_step (the generated functor, one op) against the cell's generated torch step,
    on the pre-activations with every bias in them, as the stepper calls it."""
    from lmtrain.model.kernels import step_ops

    cell = CELLS[name]
    x, state, w_ih, w_hh, b_ih, b_hh, extra = (t.detach() if isinstance(t, torch.Tensor) else t
                                               for t in inputs(cell, dtype))
    state = tuple(s.detach() for s in state)
    extra = tuple(e.detach() for e in extra)
    xg = x[0] @ w_ih.t() + b_ih
    hg = state[0] @ w_hh.t() + (b_hh if b_hh is not None else 0)
    ours = step_ops.cell_step(name, xg, hg, state, extra)
    expected, _ = cell.forward_step(xg, hg, state, extra)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert a.dtype == dtype and (a - b).abs().max().item() <= tol


def test_the_stepper_takes_the_one_op_step_for_every_cell_but_the_lstm():
    from lmtrain.config import ModelConfig
    from lmtrain.generation.stepper import Stepper
    from lmtrain.model import LanguageModel

    model = LanguageModel(ModelConfig(cell="gru,slstm,peephole", layers=3, embedding_size=8, hidden_size=8), 20)
    assert Stepper(model.eval()).cell_steps == [True, True, True]


@pytest.mark.parametrize("cell, bound", [("gru", 1.0), ("lstm", 0.75), ("rnn", 1.1)])
def test_a_stacks_backward_holds_no_more_than_torchs_module(cell, bound):
    """Peak tensor memory of one forward + backward of a 2-layer stack (the profiler's allocation
    timeline, as `lmtrain bench` reports it) against torch's own module on the same input: the
    backward frees each buffer once its last reader is done and the outputs are a view of the
    saved states, so the GRU holds no more than torch.nn.GRU, the LSTM under three quarters of
    torch.nn.LSTM, and the RNN (whose weight gradients are one product over the whole sequence)
    within a tenth of torch.nn.RNN."""
    from lmtrain.tools.bench import OurStack, TorchStack, stack_step
    from lmtrain.tools.bench_timing import peak_memory_mb

    torch.manual_seed(0)
    x = torch.randn(12, 4, 128, requires_grad=True)
    ours = stack_step(OurStack(cell, 2, 128), x, None, True)
    theirs = stack_step(TorchStack(cell, 2, 128), x, None, False)
    ours(), theirs(), ours(), theirs()
    cpu = torch.device("cpu")
    ours_mb, theirs_mb = peak_memory_mb(ours, cpu), peak_memory_mb(theirs, cpu)
    assert ours_mb <= bound * theirs_mb, (ours_mb, theirs_mb)
