"""The mogrifier cell (lmtrain/model/cells/mogrifier.py): its fast path against its plain-autograd
reference in float64 (outputs, final state, every gradient), rounds 0 against our lstm, gradcheck,
its layer (shapes, init, weight drop, mixed precision), its config keys and a CLI run."""

from __future__ import annotations

import tomllib

import pytest
import torch
from helpers import TINY_WORD, assert_config_refused, assert_trains_in_bf16, cli, evaluate_and_generate, ok, sets, write_small_corpus

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel, get_cell, layer_class, model_shapes, run_layer
from lmtrain.model.cells import lstm, mogrifier
from lmtrain.model.kernels import mixed

F64 = torch.float64


def inputs(rounds, rank, steps=6, batch=3, input_size=5, hidden=4, dtype=F64, seed=0):
    """x, (h, c), w_ih, w_hh, b_ih and each round's parameters, all leaves."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.5: (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()  # noqa: E731
    shapes = mogrifier.round_shapes(rounds, rank, input_size, hidden)
    names = mogrifier.round_names(rounds, rank)
    params = {name: r(*shape) for name, shape in shapes.items()}
    return (r(steps, batch, input_size, scale=1.0), (r(batch, hidden), r(batch, hidden)), r(4 * hidden, input_size),
            r(4 * hidden, hidden), r(4 * hidden), tuple(tuple(params[n] for n in each) for each in names))


def leaves(x, state, w_ih, w_hh, b_ih, rounds):
    return [x, *state, w_ih, w_hh, b_ih, *(t for parameters in rounds for t in parameters)]


def outputs_and_grads(run, args, seed=1):
    """y, h_T, c_T and the gradient of a random weighting of all three at every leaf."""
    y, (h, c) = run(*args)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (y, h, c))
    return [y, h, c, *torch.autograd.grad(loss, leaves(*args))]


def worst(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
    return max(((a - b).abs().max() / max(1.0, b.abs().max().item())).item() for a, b in zip(got, want))


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("rounds", [0, 1, 2, 3, 6])
def test_the_fast_path_computes_what_the_reference_computes(rounds, rank):
    args = inputs(rounds, rank)
    assert worst(outputs_and_grads(mogrifier.run, args), outputs_and_grads(mogrifier.reference, args)) <= 1e-12


def test_rounds_do_change_the_output_and_every_round_gets_a_gradient():
    x, state, w_ih, w_hh, b_ih, rounds = args = inputs(5, 0, seed=2)
    y, _ = mogrifier.run(*args)
    plain, _ = mogrifier.run(x, state, w_ih, w_hh, b_ih, ())
    assert (y - plain).abs().max() > 1e-2
    grads = outputs_and_grads(mogrifier.run, args)[3 + 6:]
    assert len(grads) == 10 and all(g.abs().min() > 0 for g in grads[1::2])  # each bias: every entry
    assert all(g.abs().max() > 0 for g in grads)


def test_rounds_0_is_our_lstm():
    x, state, w_ih, w_hh, b_ih, rounds = args = inputs(0, 0, seed=3)
    assert rounds == ()

    def ours(x, state, w_ih, w_hh, b_ih, rounds):
        return run_layer(lstm, x, state, w_ih, w_hh, b_ih)

    assert worst(outputs_and_grads(mogrifier.run, args), outputs_and_grads(ours, args)) <= 1e-13


@pytest.mark.parametrize("rounds, rank", [(3, 0), (4, 2)])
def test_gradcheck_with_state_in_and_out(rounds, rank):
    x, (h, c), w_ih, w_hh, b_ih, params = inputs(rounds, rank, steps=3, batch=2, input_size=3, hidden=2, seed=4)
    flat = [t for parameters in params for t in parameters]

    def run(x, h, c, w_ih, w_hh, b_ih, *flat):
        return mogrifier.Mogrify.apply(rounds, rank > 0, None, x, h, c, w_ih, w_hh, b_ih, *flat)

    assert torch.autograd.gradcheck(run, (x, h, c, w_ih, w_hh, b_ih, *flat))


def test_windows_in_turn_carry_the_state():
    """Two windows, the second from the first's final state: the whole sequence's outputs."""
    x, state, w_ih, w_hh, b_ih, rounds = inputs(3, 2, steps=8, seed=5)
    whole, final = mogrifier.run(x, state, w_ih, w_hh, b_ih, rounds)
    first, carried = mogrifier.run(x[:5], state, w_ih, w_hh, b_ih, rounds)
    second, final_2 = mogrifier.run(x[5:], carried, w_ih, w_hh, b_ih, rounds)
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-14)
    assert all(torch.allclose(a, b, atol=1e-14) for a, b in zip(final, final_2))


def config(**changes) -> ModelConfig:
    return ModelConfig(cell="mogrifier", layers=2, embedding_size=6, hidden_size=5, **changes)


@pytest.mark.parametrize("rank", [0, 2])
def test_the_layer_holds_the_lstm_and_each_round_with_its_shapes(rank):
    c = config(mogrifier_rounds=3, mogrifier_rank=rank)
    model = LanguageModel(c, 11)
    layer = model.layers[0]
    assert type(layer) is layer_class(get_cell("mogrifier")) is mogrifier.Layer
    names = ["w_ih", "w_hh", "b_ih"] + (["q1_out", "q1_in", "q1_bias", "r2_out", "r2_in", "r2_bias", "q3_out", "q3_in", "q3_bias"]
                                        if rank else ["q1", "q1_bias", "r2", "r2_bias", "q3", "q3_bias"])
    assert list(layer.state_dict()) == names
    expected = {"q1": (6, 5), "r2": (5, 6), "q1_out": (6, 2), "q1_in": (2, 5), "r2_out": (5, 2), "r2_in": (2, 6),
                "q1_bias": (6,), "r2_bias": (5,), "w_ih": (20, 6)}
    assert all(tuple(layer.state_dict()[k].shape) == v for k, v in expected.items() if k in names)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model_shapes(c, 11)
    for names_of_round in layer.names:
        assert (getattr(layer, names_of_round[-1]) == 0).all()  # every round's bias starts at 0
    y, (h, cell) = layer(torch.randn(4, 2, 6), layer.init_state(2, torch.empty(0)))
    assert y.shape == (4, 2, 5) and h.shape == cell.shape == (2, 5) and torch.equal(y[-1], h)


def test_a_factored_round_spreads_as_a_full_matrix():
    """At rank k each factor is drawn so that the product's entries have the variance of a full
    matrix drawn in ±init_range: init_range² / 3."""
    torch.manual_seed(0)
    layer = LanguageModel(ModelConfig(cell="mogrifier", layers=1, embedding_size=200, hidden_size=300,
                                      mogrifier_rounds=1, mogrifier_rank=16), 5).layers[0]
    product = layer.q1_out @ layer.q1_in
    assert product.shape == (200, 300)
    assert product.var().item() == pytest.approx(0.1**2 / 3, rel=0.1)


def test_forget_bias_acts_on_the_lstms_bias():
    torch.manual_seed(0)
    plain = LanguageModel(config(), 11)
    torch.manual_seed(0)
    biased = LanguageModel(config(forget_bias=1.0), 11)
    h = 5
    for a, b in zip(plain.layers, biased.layers):
        assert torch.allclose(b.b_ih[h : 2 * h] - a.b_ih[h : 2 * h], torch.ones(h))
        assert torch.equal(b.b_ih[:h], a.b_ih[:h]) and torch.equal(b.q1, a.q1)


def test_weight_drop_masks_w_hh_once_per_window_in_training_only():
    torch.manual_seed(0)
    layer = LanguageModel(config(mogrifier_rounds=2), 11).layers[1].double()
    x = torch.randn(5, 3, 5, dtype=F64)
    state = layer.init_state(3, x)
    layer.eval()
    y_eval, _ = layer(x, state, weight_drop=0.5)
    y_ref, _ = mogrifier.reference(x, state, layer.w_ih, layer.w_hh, layer.b_ih, layer.parameters_of_rounds())
    assert torch.allclose(y_eval, y_ref, atol=1e-13)  # no drop outside training
    layer.train()
    torch.manual_seed(1)
    y_train, _ = layer(x, state, weight_drop=0.5)
    y_train.sum().backward()
    torch.manual_seed(1)  # the same mask, by hand: one for the window
    dropped = torch.nn.functional.dropout(layer.w_hh.detach(), 0.5, True)
    y_mask, _ = mogrifier.reference(x, state, layer.w_ih, dropped, layer.b_ih, layer.parameters_of_rounds())
    assert torch.allclose(y_train, y_mask, atol=1e-13) and not torch.allclose(y_train, y_eval)
    assert (dropped == 0).any() and (layer.w_hh.grad[dropped == 0] == 0).all()  # the mask on the gradient too
    assert (layer.w_hh.grad[dropped != 0] != 0).all()


def rounded_reference(x, state, w_ih, w_hh, b_ih, rounds):
    """The reference with every product on bfloat16-rounded operands (float32 sums): what mixed
    precision's forward computes."""
    op = lambda t: mixed.operand(t, torch.bfloat16)  # noqa: E731
    h, c = state
    outputs = []
    for x_t in x:
        for i, (*matrices, bias) in enumerate(rounds, start=1):
            source = h if i % 2 else x_t
            a = (op(op(source) @ op(matrices[1]).t()) @ op(matrices[0]).t() if len(matrices) == 2
                 else op(source) @ op(matrices[0]).t()) + bias
            if i % 2:
                x_t = 2 * torch.sigmoid(a) * x_t
            else:
                h = 2 * torch.sigmoid(a) * h
        i_, f, g, o = (op(x_t) @ op(w_ih).t() + op(h) @ op(w_hh).t() + b_ih).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i_) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


@pytest.mark.parametrize("rank", [0, 3])
def test_mixed_precision_rounds_every_products_operands(rank):
    args = inputs(4, rank, steps=5, batch=4, input_size=12, hidden=10, dtype=torch.float32, seed=6)
    low = outputs_and_grads(lambda *a: mogrifier.run(*a, compute_dtype=torch.bfloat16), args)
    full = outputs_and_grads(mogrifier.run, args)
    with torch.no_grad():
        y, (h, c) = rounded_reference(*args)
    assert worst(low[:3], [y, h, c]) <= 1e-5  # the same roundings, float32 sums in another order
    assert worst(low[:3], full[:3]) > 1e-4  # ... which float32 does not make
    assert all(a.dtype == torch.float32 and torch.isfinite(a).all() for a in low)
    assert worst(low, full) <= 5e-2


def test_a_stack_of_mogrifier_and_lstm_layers_trains_in_bf16():
    assert_trains_in_bf16(["model.cell=mogrifier,lstm", "model.mogrifier_rank=2"], [2, 2])


@pytest.mark.parametrize("setting, fragment", [
    ("model.mogrifier_rounds=-1", "config key 'model.mogrifier_rounds' must not be negative, got -1"),
    ("model.mogrifier_rank=-3", "config key 'model.mogrifier_rank' must not be negative, got -3"),
    ("model.mogrifier_rounds=2.5", "config key 'model.mogrifier_rounds' must be int, got 2.5"),
    ("model.mogrifier_rounds=5000", "config key 'model.mogrifier_rounds' must be at most 1,024, got 5,000"),
    ("model.mogrifier_rank=true", "config key 'model.mogrifier_rank' must be int, got True"),
])
def test_bad_values_are_one_error_line_naming_the_key(setting, fragment, tmp_path):
    assert_config_refused(tmp_path, ["model.cell=mogrifier", setting], fragment, "model.mogrifier_r")


def test_train_evaluate_and_generate_through_the_cli(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*TINY_WORD, "model.layers=2", "model.cell=mogrifier",
                                                     "model.mogrifier_rounds=4", "model.mogrifier_rank=3",
                                                     "model.weight_drop=0.2", "model.forget_bias=1.0",
                                                     "train.max_steps=6", "train.log_interval=3")))
    saved = tomllib.loads((run / "config.toml").read_text())["model"]
    assert (saved["cell"], saved["mogrifier_rounds"], saved["mogrifier_rank"]) == ("mogrifier", 4, 3)
    evaluate_and_generate(run)


def test_export_refuses_it_by_name():
    from lmtrain.config import Config
    from lmtrain.model import onnx_bytes, torch_lstm_payload

    model = LanguageModel(config(), 11)
    with pytest.raises(LmtrainError, match="this run has mogrifier layers"):
        torch_lstm_payload(Config(model=config()), model.state_dict())
    pytest.importorskip("onnx")
    with pytest.raises(LmtrainError, match="does not cover the mogrifier cell"):
        onnx_bytes(model)
