"""The qrnn cell (lmtrain/model/cells/qrnn.py): its fast path against its plain-autograd reference
in float64 (outputs, final state, every gradient; window 1 and 2), gradcheck with state in and
out, windows in turn as one long window (x_prev carried for window 2), its layer (shapes, state,
forget bias, weight drop, mixed precision), its config key and a CLI run."""

from __future__ import annotations

import tomllib

import pytest
import torch
from helpers import TINY_WORD, assert_config_refused, assert_trains_in_bf16, cli, evaluate_and_generate, ok, sets, write_small_corpus

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel, get_cell, layer_class, model_shapes, state_widths
from lmtrain.model.cells import qrnn
from lmtrain.model.kernels import dispatch, mixed

F64 = torch.float64


def inputs(window, steps=6, batch=3, input_size=5, hidden=4, dtype=F64, seed=0):
    """x, the state ((h, c) or (h, c, x_prev)), w_ih, b_ih, all leaves."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.5: (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()  # noqa: E731
    state = (r(batch, hidden), r(batch, hidden)) + ((r(batch, input_size, scale=1.0),) if window == 2 else ())
    return r(steps, batch, input_size, scale=1.0), state, r(3 * hidden, window * input_size), r(3 * hidden)


def outputs_and_grads(run, args, window, seed=1):
    """y, the final state and the gradient of a random weighting of them all at every leaf (None
    for the initial h, which enters nothing)."""
    x, state, w_ih, b_ih = args
    y, final = run(x, state, w_ih, b_ih, window)
    assert len(final) == len(state)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (y, *final))
    return [y, *final, *torch.autograd.grad(loss, [x, *state, w_ih, b_ih], allow_unused=True)]


def worst(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        assert a is None or (a.shape == b.shape and a.dtype == b.dtype)
    return max(((a - b).abs().max() / max(1.0, b.abs().max().item())).item() for a, b in zip(got, want) if a is not None)


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("window", [1, 2])
def test_the_fast_path_computes_what_the_reference_computes(window, steps):
    args = inputs(window, steps=steps)
    got, want = outputs_and_grads(qrnn.run, args, window), outputs_and_grads(qrnn.reference, args, window)
    assert worst(got, want) <= 1e-12
    grads = got[1 + len(args[1]):]
    assert grads[1] is None  # h_0 enters nothing
    assert all(g.abs().max() > 0 for g in grads if g is not None)  # every other leaf gets a gradient


@pytest.mark.parametrize("window", [1, 2])
def test_gradcheck_with_state_in_and_out(window):
    x, (h, c, *rest), w_ih, b_ih = inputs(window, steps=3, batch=2, input_size=3, hidden=2, seed=4)
    x_prev = rest[0] if rest else None

    def run(x, c, w_ih, b_ih, *x_prev):
        return qrnn.QRNNWindow.apply(None, x, w_ih, b_ih, c, x_prev[0] if x_prev else None)

    assert torch.autograd.gradcheck(run, (x, c, w_ih, b_ih, *rest))


@pytest.mark.parametrize("window", [1, 2])
def test_windows_in_turn_are_one_long_window(window):
    """Two windows, the second from the first's final state (x_prev included): the whole sequence's
    outputs, final state and gradients."""
    x, state, w_ih, b_ih = inputs(window, steps=8, seed=5)

    def in_turn(x, state, w_ih, b_ih, window):
        first, carried = qrnn.run(x[:5], state, w_ih, b_ih, window)
        second, final = qrnn.run(x[5:], carried, w_ih, b_ih, window)
        return torch.cat([first, second]), final

    assert worst(outputs_and_grads(in_turn, (x, state, w_ih, b_ih), window),
                 outputs_and_grads(qrnn.run, (x, state, w_ih, b_ih), window)) <= 1e-14


def test_window_2_sees_the_previous_input_and_carries_it():
    x, state, w_ih, b_ih = inputs(2, steps=4, seed=6)
    y, final = qrnn.run(x, state, w_ih, b_ih, 2)
    assert torch.equal(final[2], x[-1])  # the carried x_prev is the window's last input
    forgotten = (state[0], state[1], torch.zeros_like(state[2]))
    y_zero, _ = qrnn.run(x, forgotten, w_ih, b_ih, 2)
    assert (y[0] - y_zero[0]).abs().max() > 1e-3  # the first step reads x_prev ...
    x_later = x.detach().clone()
    x_later[2] += 1.0  # ... and step t reads x_{t-1} and x_t only through the gates: y_0, y_1 unchanged
    y_later, _ = qrnn.run(x_later, state, w_ih, b_ih, 2)
    assert torch.equal(y_later[:2], y[:2]) and (y_later[2:] - y[2:]).abs().max() > 1e-3


def test_window_1_with_the_left_half_of_a_window_2_filter_is_window_1():
    """Window 2 with the x_{t-1} half of W at zero computes window 1 with the other half."""
    x, (h, c, x_prev), w_ih, b_ih = inputs(2, seed=7)
    w = w_ih.detach().clone()
    w[:, :5] = 0
    y2, (_, c2, _) = qrnn.run(x, (h, c, x_prev), w, b_ih, 2)
    y1, (_, c1) = qrnn.run(x, (h, c), w[:, 5:].contiguous(), b_ih, 1)
    assert torch.allclose(y1, y2, atol=1e-14) and torch.allclose(c1, c2, atol=1e-14)


def config(**changes) -> ModelConfig:
    return ModelConfig(cell="qrnn", layers=2, embedding_size=6, hidden_size=5, **changes)


@pytest.mark.parametrize("window", [1, 2])
def test_the_layer_its_shapes_and_its_state(window):
    c = config(qrnn_window=window)
    model = LanguageModel(c, 11)
    layer = model.layers[0]
    assert type(layer) is layer_class(get_cell("qrnn")) is qrnn.Layer
    assert not dispatch.on_engine(get_cell("qrnn"))
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {"w_ih": (15, window * 6), "b_ih": (15,)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model_shapes(c, 11)
    widths = [{"h": 5, "c": 5} | ({"x_prev": 6} if window == 2 else {}), {"h": 5, "c": 5} | ({"x_prev": 5} if window == 2 else {})]
    assert state_widths(c) == widths
    state = model.init_state(2)
    assert [[s.shape[1] for s in layer_state] for layer_state in state] == [list(w.values()) for w in widths]
    assert all((s == 0).all() for layer_state in state for s in layer_state)
    logits, final = model(torch.randint(0, 11, (4, 2)), state)
    assert logits.shape == (4, 2, 11) and [len(s) for s in final] == [len(w) for w in widths]


def test_forget_bias_acts_on_the_f_gate():
    torch.manual_seed(0)
    plain = LanguageModel(config(), 11)
    torch.manual_seed(0)
    biased = LanguageModel(config(forget_bias=1.0), 11)
    h = 5
    for a, b in zip(plain.layers, biased.layers):
        assert torch.allclose(b.b_ih[h : 2 * h] - a.b_ih[h : 2 * h], torch.ones(h))
        assert torch.equal(b.b_ih[:h], a.b_ih[:h]) and torch.equal(b.b_ih[2 * h :], a.b_ih[2 * h :])


def test_weight_drop_masks_the_filter_once_per_window_in_training_only():
    torch.manual_seed(0)
    layer = LanguageModel(config(qrnn_window=2), 11).layers[1].double()
    x = torch.randn(5, 3, 5, dtype=F64)
    state = layer.init_state(3, x)
    layer.eval()
    y_eval, _ = layer(x, state, weight_drop=0.5)
    y_ref, _ = qrnn.reference(x, state, layer.w_ih, layer.b_ih, 2)
    assert torch.allclose(y_eval, y_ref, atol=1e-13)  # no drop outside training
    layer.train()
    torch.manual_seed(1)
    y_train, _ = layer(x, state, weight_drop=0.5)
    y_train.sum().backward()
    torch.manual_seed(1)  # the same mask, by hand: one for the window
    dropped = torch.nn.functional.dropout(layer.w_ih.detach(), 0.5, True)
    y_mask, _ = qrnn.reference(x, state, dropped, layer.b_ih, 2)
    assert torch.allclose(y_train, y_mask, atol=1e-13) and not torch.allclose(y_train, y_eval)
    assert (dropped == 0).any() and (layer.w_ih.grad[dropped == 0] == 0).all()  # the mask on the gradient too
    assert (layer.w_ih.grad[dropped != 0] != 0).all()


@pytest.mark.parametrize("window", [1, 2])
def test_mixed_precision_rounds_the_gemms_operands(window):
    x, state, w_ih, b_ih = args = inputs(window, steps=5, batch=4, input_size=12, hidden=10, dtype=torch.float32, seed=8)
    low = outputs_and_grads(lambda *a: qrnn.run(*a, compute_dtype=torch.bfloat16), args, window)
    full = outputs_and_grads(qrnn.run, args, window)
    op = lambda t: mixed.operand(t, torch.bfloat16)  # noqa: E731
    with torch.no_grad():
        y, final = qrnn.reference(op(x).float(), tuple(s if i < 2 else op(s).float() for i, s in enumerate(state)),
                                  op(w_ih).float(), b_ih, window)
    assert worst(low[:1], [y]) <= 1e-5  # the same roundings, float32 sums in another order
    assert worst(low[:1], full[:1]) > 1e-4  # ... which float32 does not make
    assert all(a is None or (a.dtype == torch.float32 and torch.isfinite(a).all()) for a in low)
    assert worst(low, full) <= 5e-2


def test_a_stack_of_qrnn_and_lstm_layers_trains_in_bf16():
    assert_trains_in_bf16(["model.cell=qrnn,lstm", "model.qrnn_window=2"], [3, 2])


@pytest.mark.parametrize("setting, fragment", [
    ("model.qrnn_window=3", "config key 'model.qrnn_window' must be 1 or 2, got 3"),
    ("model.qrnn_window=0", "config key 'model.qrnn_window' must be 1 or 2, got 0"),
    ("model.qrnn_window=1.5", "config key 'model.qrnn_window' must be int, got 1.5"),
])
def test_bad_values_are_one_error_line_naming_the_key(setting, fragment, tmp_path):
    assert_config_refused(tmp_path, ["model.cell=qrnn", setting], fragment, "model.qrnn_window")


def test_train_evaluate_and_generate_through_the_cli(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*TINY_WORD, "model.layers=2", "model.cell=qrnn",
                                                     "model.qrnn_window=2", "model.weight_drop=0.2",
                                                     "model.forget_bias=1.0", "train.max_steps=6",
                                                     "train.log_interval=3")))
    saved = tomllib.loads((run / "config.toml").read_text())["model"]
    assert (saved["cell"], saved["qrnn_window"]) == ("qrnn", 2)
    evaluate_and_generate(run)


def test_export_refuses_it_by_name():
    from lmtrain.config import Config
    from lmtrain.model import onnx_bytes, torch_lstm_payload

    model = LanguageModel(config(), 11)
    with pytest.raises(LmtrainError, match="this run has qrnn layers"):
        torch_lstm_payload(Config(model=config()), model.state_dict())
    pytest.importorskip("onnx")
    with pytest.raises(LmtrainError, match="does not cover the qrnn cell"):
        onnx_bytes(model)
