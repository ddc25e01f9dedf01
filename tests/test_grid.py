"""The 2-D Grid LSTM stack (model.stack = grid, lmtrain.model.grid): the fast path against the
plain-autograd reference, gradcheck with state in and out, windows in turn, the model's stack of
blocks against the equations written out over the grid, tying across depth, mixed precision, config
errors, exact resume, export refusing it, and a train/evaluate/generate run through the CLI."""

from __future__ import annotations


import pytest
import torch
from helpers import TINY_WORD, assert_config_refused, assert_one_error, cli, evaluate_and_generate, ok, resume_matches_straight, sets, write_small_corpus

from lmtrain.config import ModelConfig
from lmtrain.model import LanguageModel, load_run, model_shapes, parameter_keys, state_widths
from lmtrain.model import grid

GRID = [*TINY_WORD, "model.layers=2", "model.embedding_size=16", "model.stack=grid", "train.log_interval=3"]


def weights(inputs: int, hidden: int, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    """w_ih, w_hh, b_ih, w_dx, w_dh, b_d, each requiring a gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = grid.Layer.shapes(grid, inputs, hidden)
    return [(torch.rand(shape, generator=g, dtype=dtype) - 0.5).requires_grad_() for shape in shapes.values()]


def window(T=6, B=3, I=5, H=4, below=True, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, I, generator=g, dtype=dtype).requires_grad_()
    lower = torch.randn(T, B, H, generator=g, dtype=dtype).requires_grad_() if below else None
    state = tuple(torch.randn(B, H, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return x, lower, state


@pytest.mark.parametrize("below", [False, True])
def test_the_fast_path_is_the_reference_outputs_memory_state_and_every_gradient(below):
    x, lower, state = window(below=below)
    w = weights(5, 4)
    inputs = [x, *([lower] if below else []), *state, *w]
    results = []
    for fn in (grid.reference, grid.run):
        y, m, (h, c) = fn(x, lower, state, *w)
        g = torch.Generator().manual_seed(7)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (y, m, h, c))
        results.append(((y, m, h, c), torch.autograd.grad(loss, inputs)))
    (out_ref, grad_ref), (out_fast, grad_fast) = results
    for a, b in zip(out_ref, out_fast):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(grad_ref, grad_fast):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradcheck_with_state_and_the_memory_below_in_and_out():
    x, lower, state = window(T=3, B=2, I=3, H=2)
    w = weights(3, 2)

    def f(x, lower, h, c, *w):
        y, m, (h2, c2) = grid.run(x, lower, (h, c), *w)
        return y, m, h2, c2

    assert torch.autograd.gradcheck(f, (x, lower, *state, *w))


def test_windows_in_turn_are_one_long_window():
    x, lower, state = window(T=8)
    w = weights(5, 4)
    with torch.no_grad():
        y, m, final = grid.run(x, lower, state, *w)
        y1, m1, mid = grid.run(x[:5], lower[:5], state, *w)
        y2, m2, end = grid.run(x[5:], lower[5:], mid, *w)
    torch.testing.assert_close(torch.cat([y1, y2]), y, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat([m1, m2]), m, rtol=0, atol=1e-14)
    for a, b in zip(end, final):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def grid_by_hand(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """The grid's equations block by block, step t outer and depth d inner (the order of the paper's
    figure): each block reads time's (h, c) from its left and depth's (y, m) from below."""
    layers = model.layers
    B = tokens.size(1)
    time = [(torch.zeros(B, layer.hidden_size, dtype=torch.float64),) * 2 for layer in layers]
    tops = []
    for t in range(tokens.size(0)):
        y, m = model.embedding(tokens[t]), None
        for d, layer in enumerate(layers):
            h, c = time[d]
            H = torch.cat([h, y], 1)
            gates = H @ torch.cat([layer.w_hh, layer.w_ih], 1).t() + layer.b_ih
            i, f, g, o = gates.chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            time[d] = (torch.sigmoid(o) * torch.tanh(c_new), c_new)
            i, f, g, o = (H @ torch.cat([layer.w_dh, layer.w_dx], 1).t() + layer.b_d).chunk(4, 1)
            m = torch.sigmoid(i) * torch.tanh(g) + (0 if m is None else torch.sigmoid(f) * m)
            y = torch.sigmoid(o) * torch.tanh(m)
        tops.append(y)
    return model.decoder(torch.stack(tops))


@pytest.mark.parametrize("tied", [False, True])
def test_the_model_is_the_grid_block_by_block(tied):
    torch.manual_seed(0)
    config = ModelConfig(stack="grid", grid_tied=tied, layers=3, embedding_size=6, hidden_size=6, forget_bias=1.0)
    model = LanguageModel(config, 13).double().eval()
    tokens = torch.randint(0, 13, (5, 2))
    logits, _ = model(tokens, model.init_state(2))
    torch.testing.assert_close(logits, grid_by_hand(model, tokens), rtol=0, atol=1e-12)


def test_tied_layers_share_one_set_of_weights_and_the_counts_see_it_once():
    config = ModelConfig(stack="grid", grid_tied=True, layers=3, embedding_size=6, hidden_size=6, forget_bias=1.0)
    model = LanguageModel(config, 13)
    assert all(layer.w_ih is model.layers[0].w_ih and layer.b_d is model.layers[0].b_d for layer in model.layers)
    untied = LanguageModel(ModelConfig(stack="grid", layers=3, embedding_size=6, hidden_size=6), 13)
    per_layer = sum(p.numel() for p in untied.layers[0].parameters())
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == 2 * per_layer
    names = [name for name, _ in model.named_parameters()]
    assert names == parameter_keys(config, model_shapes(config, 13))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model_shapes(config, 13)
    forget = model.layers[0].b_ih.detach()[6:12]  # forget_bias added once, not once per layer
    assert float(forget.min()) >= 0.9 and float(forget.max()) <= 1.1
    assert float(model.layers[0].b_d.detach()[6:12].min()) >= 0.9


def test_the_shapes_and_state_are_computed_as_built():
    config = ModelConfig(stack="grid", layers=2, embedding_size=5, hidden_size=7)
    model = LanguageModel(config, 11)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model_shapes(config, 11)
    assert model_shapes(config, 11)["layers.0.w_dx"] == (28, 5) and model_shapes(config, 11)["layers.1.w_dh"] == (28, 7)
    assert state_widths(config) == [{"h": 7, "c": 7}, {"h": 7, "c": 7}]
    assert [tuple(s.shape) for s in model.init_state(3)[1]] == [(3, 7), (3, 7)]


def test_mixed_precision_rounds_the_products_as_the_reference_does():
    x, lower, state = window(dtype=torch.float32)
    w = [p.detach().float() for p in weights(5, 4)]
    with torch.no_grad():
        y_ref, m_ref, _ = grid.reference(x, lower, state, *w, compute_dtype=torch.bfloat16)
        y, m, _ = grid.run(x, lower, state, *w, compute_dtype=torch.bfloat16)
        y32, _, _ = grid.run(x, lower, state, *w)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-5)
    assert float((y - y32).abs().max()) > 1e-5  # the rounding happened


def test_weight_drop_drops_both_matrices_that_read_the_past():
    torch.manual_seed(0)
    config = ModelConfig(stack="grid", layers=1, embedding_size=6, hidden_size=6, weight_drop=0.5)
    model = LanguageModel(config, 13).double()
    tokens = torch.randint(0, 13, (4, 2))
    model.train()
    logits, _ = model(tokens, model.init_state(2))
    logits.sum().backward()
    layer = model.layers[0]
    for name in ("w_hh", "w_dh"):
        grad = getattr(layer, name).grad
        assert 0.2 < float((grad == 0).double().mean()) < 0.8, name  # the mask's zeros reach the gradient
    # W_dx is not dropped: its only zeros are the depth forget gate's rows, which the first layer,
    # with no memory below, never uses
    forget = slice(grid.FORGET_GATE * 6, (grid.FORGET_GATE + 1) * 6)
    assert torch.all(layer.w_dx.grad[forget] == 0)
    assert float((torch.cat([layer.w_dx.grad[:6], layer.w_dx.grad[12:]]) == 0).double().mean()) == 0
    model.eval()
    a, _ = model(tokens, model.init_state(2))
    b, _ = model(tokens, model.init_state(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("setting, fragment", [
    (["model.stack=diagonal"], "config key 'model.stack' must be one of layers, grid, got 'diagonal'"),
    (["model.stack=grid", "model.cell=gru"], "config key 'model.stack' = grid is a stack of LSTM blocks: it takes model.cell = lstm, got 'gru'"),
    (["model.stack=grid", "model.hidden_size=16", "model.tie_weights=true", "model.embedding_size=12"],
     "config key 'model.stack' = grid needs equally wide layers, got 16, 12"),
    (["model.grid_tied=true"], "config key 'model.grid_tied' is for model.stack = grid, got model.stack = 'layers'"),
    (["model.stack=grid", "model.grid_tied=true", "model.embedding_size=12"],
     "config key 'model.grid_tied' shares the first layer's weights with every layer: it needs model.embedding_size = model.hidden_size, got 12 and 16"),
    (["model.stack=grid", "model.grid_tied=1"], "config key 'model.grid_tied' must be bool, got 1"),
])
def test_bad_values_are_one_error_line_naming_the_key(setting, fragment, tmp_path):
    items = [*TINY_WORD, "model.layers=2", *setting]
    assert_config_refused(tmp_path, items, fragment, "model.(stack|grid_tied)")


@pytest.mark.parametrize("tied", ["false", "true"])
def test_resume_continues_exactly(tmp_path, tied):
    run = resume_matches_straight(tmp_path, [*GRID, f"model.grid_tied={tied}", "train.optimizer=adamw", "train.lr=0.003"])
    loaded = load_run(run, torch.device("cpu")).model
    assert (loaded.layers[1].w_ih is loaded.layers[0].w_ih) == (tied == "true")  # the tie survives the checkpoint


def test_train_evaluate_generate_and_export_through_the_cli(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*GRID, "model.grid_tied=true", "train.max_steps=6")))
    evaluate_and_generate(run)
    for fmt, fragment in (("torch-lstm", "model.stack is grid"), ("onnx", "grid")):
        result = cli("export", run, "--out", tmp_path / f"out.{fmt}", "--format", fmt)
        assert_one_error(result, fragment)


@pytest.mark.parametrize("training", [False, True])
def test_zoneout_acts_on_times_state_as_on_an_lstm_layers(training):
    """A grid layer's (h, c) with zoneout is what our lstm layer with the same time weights and the
    same masks carries; depth reads that zoned h, so the output moves with it."""
    from lmtrain.model import RecurrentLayer, get_cell

    torch.manual_seed(0)
    config = ModelConfig(stack="grid", layers=1, embedding_size=6, hidden_size=6, zoneout_hidden=0.3, zoneout_cell=0.2)
    layer = LanguageModel(config, 13).double().layers[0].train(training)
    plain = RecurrentLayer(get_cell("lstm"), 6, 6, config).double().train(training)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k in plain.state_dict()})
    x = torch.randn(5, 2, 6, dtype=torch.float64)
    state = layer.init_state(2, x)
    seed = torch.random.get_rng_state()
    y, final, _ = layer(x, state)
    torch.random.set_rng_state(seed)  # the same masks
    _, want = plain(x, state)
    for a, b in zip(final, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    unzoned = LanguageModel(ModelConfig(stack="grid", layers=1, embedding_size=6, hidden_size=6), 13).double().layers[0]
    unzoned.load_state_dict(layer.state_dict())
    assert float((unzoned.train(training)(x, state)[0] - y).abs().max().detach()) > 1e-6
