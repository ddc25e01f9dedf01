"""The depth-gated LSTM (lmtrain/model/cells/dglstm.py, its window in lmtrain/model/kernels/dglstm.py):
the fast path against the plain-autograd reference in float64 (outputs, final state, every
gradient), gradcheck, the first layer against our lstm, stacks against the reference stack, its
parameters and widths, generation, and a CLI run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_WORD, assert_one_error, cli, ok, private_cache_one_thread, sets, write_small_corpus

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.generation.stepper import Stepper
from lmtrain.model import LanguageModel, get_cell, layer_class, model_shapes, run_layer, stack_forward
from lmtrain.model.kernels.dglstm import DepthGatedLSTM, run
from lmtrain.model.layer import stack

F64 = torch.float64
dglstm, lstm = get_cell("dglstm"), get_cell("lstm")


def window(depth: bool, steps=6, batch=3, inputs=4, hidden=4, dtype=F64, seed=0):
    """x, lower, state, w_ih, w_hh, b_ih, depth parameters: leaves that require grad (lower and
    depth None without the depth gate)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()

    x = leaf(steps, batch, inputs, scale=1.0)
    lower = leaf(steps, batch, hidden, scale=1.0) if depth else None
    state = (leaf(batch, hidden), leaf(batch, hidden))
    weights = (leaf(4 * hidden, inputs), leaf(4 * hidden, hidden), leaf(4 * hidden))
    gate = (leaf(hidden, inputs), leaf(hidden), leaf(hidden), leaf(hidden)) if depth else None
    return x, lower, state, *weights, gate


def leaves(x, lower, state, w_ih, w_hh, b_ih, gate):
    return [t for t in (x, lower, *state, w_ih, w_hh, b_ih, *(gate or ())) if t is not None]


def outputs(y, cells, final):
    return [y, cells, *final]


def grads_of(outs, wrt, used=None, seed=1):
    """Gradients of a random weighting of the outputs (those of `used`, by index; all by default)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for k, o in enumerate(outs)
               if used is None or k in used)
    return torch.autograd.grad(loss, wrt, allow_unused=True)


def assert_close(ours, refs, atol):
    assert len(ours) == len(refs)
    for k, (a, b) in enumerate(zip(ours, refs)):
        assert a is not None and b is not None and a.shape == b.shape, k
        assert (a - b).abs().max().item() <= atol, (k, (a - b).abs().max().item())


@pytest.mark.parametrize("depth", [True, False])
@pytest.mark.parametrize("used", [None, (0,), (1,), (2, 3)], ids=["all", "y", "cells", "final"])
def test_fast_path_matches_the_reference(depth, used):
    """Outputs, final state and the gradients of every input, the lower layer's cells and the
    initial state included; also when only some outputs reach the loss."""
    args = window(depth, seed=5)
    fast, ref = outputs(*run(*args)), outputs(*dglstm.reference(*args))
    assert_close(fast, ref, atol=1e-12)
    wrt = leaves(*args)
    fast_grads, ref_grads = grads_of(fast, wrt, used), grads_of(ref, wrt, used)
    assert_close([g if g is not None else torch.zeros_like(t) for g, t in zip(fast_grads, wrt)],
                 [g if g is not None else torch.zeros_like(t) for g, t in zip(ref_grads, wrt)], atol=1e-12)


@pytest.mark.parametrize("depth", [True, False])
def test_gradcheck_with_state_in_and_out(depth):
    x, lower, (h0, c0), w_ih, w_hh, b_ih, gate = window(depth, steps=3, batch=2, inputs=3, hidden=2, seed=3)
    if depth:
        inputs = (x, lower, h0, c0, w_ih, w_hh, b_ih, *gate)
        assert torch.autograd.gradcheck(lambda *a: DepthGatedLSTM.apply(None, *a), inputs)
    else:
        inputs = (x, h0, c0, w_ih, w_hh, b_ih)
        assert torch.autograd.gradcheck(
            lambda x, *a: DepthGatedLSTM.apply(None, x, None, *a, None, None, None, None), inputs)


def initialised(layer):
    """A layer built alone, its parameters uniform in ±0.5, in float64."""
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    return layer.double()


def test_the_first_layer_is_our_lstm():
    """No dglstm below: the LSTM's parameters only, and what lmtrain.model.cells.lstm computes."""
    layer = initialised(layer_class(dglstm)(dglstm, 4, 5))
    assert [name for name, _ in layer.named_parameters()] == ["w_ih", "w_hh", "b_ih"] and not layer.depth_gated
    x, _, state, *_ = window(False, inputs=4, hidden=5, seed=2)
    y, final, cells = stack_forward(layer, x, state, None)
    y_lstm, final_lstm = run_layer(lstm, x, state, layer.w_ih, layer.w_hh, layer.b_ih)
    _, cells_ref, _ = dglstm.reference(x, None, state, layer.w_ih, layer.w_hh, layer.b_ih)
    assert_close([y, *final, cells], [y_lstm, *final_lstm, cells_ref], atol=1e-12)
    wrt = [x, *state, layer.w_ih, layer.w_hh, layer.b_ih]
    assert_close(grads_of([y, *final], wrt), grads_of([y_lstm, *final_lstm], wrt), atol=1e-12)


def reference_stack(layers, x, states):
    """The stack in plain autograd: each layer's reference, the cells of a dglstm layer below
    reaching a depth-gated one -> the last output, every final state."""
    cells, finals = None, []
    for layer, state in zip(layers, states):
        gate = tuple(getattr(layer, name) for name in dglstm.DEPTH) if layer.depth_gated else None
        x, cells, final = dglstm.reference(x, cells if gate else None, state, layer.w_ih, layer.w_hh, layer.b_ih, gate)
        finals.append(final)
    return x, finals


@pytest.mark.parametrize("layers", [2, 3])
def test_a_stack_matches_the_reference_stack(layers):
    """Every layer above the first depth-gated; the gradient of every parameter, the input and
    every initial state against autograd through the reference stack."""
    config = ModelConfig(cell="dglstm", layers=layers, embedding_size=3, hidden_size=4)
    torch.manual_seed(0)
    model = LanguageModel(config, 7).double()
    assert [layer.depth_gated for layer in model.layers] == [False] + [True] * (layers - 1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 3, generator=g, dtype=F64, requires_grad=True)
    states = [tuple((torch.randn(2, 4, generator=g, dtype=F64) * 0.5).requires_grad_() for _ in range(2))
              for _ in range(layers)]
    out, up, finals = x, None, []
    for layer, state in zip(model.layers, states):
        out, final, up = stack_forward(layer, out, state, up)
        finals.append(final)
    ref, ref_finals = reference_stack(model.layers, x, states)
    flat = [out, *(s for f in finals for s in f)]
    flat_ref = [ref, *(s for f in ref_finals for s in f)]
    assert_close(flat, flat_ref, atol=1e-12)
    wrt = [x, *(s for state in states for s in state), *(p for layer in model.layers for p in layer.parameters())]
    assert_close(grads_of(flat, wrt), grads_of(flat_ref, wrt), atol=1e-12)


def test_mixed_precision_rounds_the_products_operands():
    """compute_dtype bfloat16: the reference with the same roundings gives the same outputs (sums in
    another order), and float32 nearly; the gradients follow float32's."""
    args = window(True, dtype=torch.float32, hidden=8, inputs=8, seed=4)
    mixed = outputs(*run(*args, compute_dtype=torch.bfloat16))
    assert_close(mixed, outputs(*dglstm.reference(*args, compute_dtype=torch.bfloat16)), atol=1e-5)
    full = outputs(*run(*args))
    assert_close(mixed, full, atol=5e-2)
    wrt = leaves(*args)
    for a, b in zip(grads_of(mixed, wrt), grads_of(full, wrt)):
        assert (a - b).abs().max().item() <= 5e-2 * max(1.0, b.abs().max().item())


def test_the_parameters_and_their_shapes():
    """The depth gate's w_xd (H, I), b_d, w_ld, w_cd (H,) only above a dglstm layer; a dglstm layer
    on another cell is the LSTM; model_shapes is the model's."""
    config = ModelConfig(cell="gru,dglstm,dglstm,lstm", layers=4, embedding_size=3, hidden_size=5)
    model = LanguageModel(config, 7)
    assert [getattr(layer, "depth_gated", None) for layer in model.layers] == [None, False, True, None]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model_shapes(config, 7)
    assert [k for k in model.state_dict() if k.startswith("layers.2.")] == [
        "layers.2.w_ih", "layers.2.w_hh", "layers.2.b_ih", "layers.2.w_xd", "layers.2.b_d", "layers.2.w_ld", "layers.2.w_cd"]
    assert model.state_dict()["layers.2.w_xd"].shape == (5, 5)
    assert [below for *_, below in stack(config)] == [None, get_cell("gru"), dglstm, dglstm]


def test_forget_bias_and_torch_init_reach_the_layer():
    config = ModelConfig(cell="dglstm", layers=2, embedding_size=4, hidden_size=4, init_range=0.0, forget_bias=1.5)
    layer = LanguageModel(config, 7).layers[1]
    assert torch.equal(layer.b_ih[4:8], torch.full((4,), 1.5)) and layer.b_ih[:4].abs().max() == 0
    torch_init = LanguageModel(ModelConfig(cell="dglstm", layers=2, embedding_size=4, hidden_size=4, recurrent_init="torch"), 7)
    assert 0.1 < torch_init.layers[1].w_xd.abs().max() <= 0.5  # ±1/sqrt(4), beyond init_range 0.1


def test_weight_drop_masks_w_hh_as_the_other_cells():
    layer = initialised(layer_class(dglstm)(dglstm, 4, 4, below=dglstm)).train()
    x, lower, state, *_ = window(True, seed=6)
    torch.manual_seed(3)
    y, _, _ = layer(x, state, 0.5, below=lower)
    torch.manual_seed(3)
    dropped = F.dropout(layer.w_hh, 0.5, True)
    gate = tuple(getattr(layer, name) for name in dglstm.DEPTH)
    y_ref, _, _ = dglstm.reference(x, lower, state, layer.w_ih, dropped, layer.b_ih, gate)
    assert_close([y], [y_ref], atol=1e-12)
    y_eval, _, _ = layer.eval()(x, state, 0.5, below=lower)  # no weight drop outside training
    assert (y_eval - y).abs().max() > 1e-3


def test_a_dglstm_layer_on_a_narrower_dglstm_layer_is_refused():
    tied = ModelConfig(cell="dglstm", layers=2, embedding_size=3, hidden_size=5, tie_weights=True)
    for build in (lambda: LanguageModel(tied, 7), lambda: model_shapes(tied, 7)):
        with pytest.raises(LmtrainError, match="model.tie_weights") as error:
            build()
        assert "\n" not in str(error.value)
    LanguageModel(ModelConfig(cell="dglstm,lstm", layers=2, embedding_size=3, hidden_size=5, tie_weights=True), 7)
    LanguageModel(ModelConfig(cell="dglstm", layers=2, embedding_size=5, hidden_size=5, tie_weights=True), 7)


@pytest.mark.parametrize("cell", ["dglstm", "gru,dglstm,dglstm", "dglstm,dglstm,gru"])
def test_generation_steps_give_the_models_forward(cell):
    """The stepper runs the layers a token at a time through their forward: the cells passed up
    at each step give what the window does."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(cell=cell, layers=3, embedding_size=8, hidden_size=8, init_range=0.4), 20).eval()
    tokens = torch.randint(0, 20, (7, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_state = model(tokens, model.init_state(3))
    stepper, state, stepped = Stepper(model), model.init_state(3), []
    for token in tokens:
        logits, state = stepper.step(token, state)
        stepped.append(logits)
    assert torch.allclose(torch.stack(stepped), expected, atol=1e-5)
    for ours, theirs in zip(state, expected_state):
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


STEPS = ["train.max_steps=6", "train.epochs=1", "train.log_interval=3"]


def test_train_evaluate_and_generate_through_the_cli(isolated, tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run_dir, *sets(*TINY_WORD, *STEPS, "model.cell=dglstm", "model.layers=2",
                                                        "model.hidden_size=12", "model.weight_drop=0.2")))
    assert "test:" in ok(cli("evaluate", run_dir)).stdout
    text = ok(cli("generate", run_dir, "--prompt", "The", "--max-tokens", "8", "--seed", "1")).stdout
    assert text.strip()


def test_the_width_error_through_the_cli(isolated, tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    assert_one_error(cli("train", corpus, "--run-dir", tmp_path / "run",
                         *sets(*TINY_WORD, *STEPS, "model.cell=dglstm", "model.layers=2", "model.tie_weights=true")),
                     "model.cell", "dglstm", "model.tie_weights", "model.hidden_size")
