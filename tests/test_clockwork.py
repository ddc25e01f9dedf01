"""The clockwork cell (lmtrain/model/cells/clockwork.py): its fast path against its plain-autograd
reference in float64 (outputs, final state with the step counter, every gradient), gradcheck with
state in and out, windows in turn as one long window (the counter carried), the modules' clocks
and the mask's direction observed, the masked W_hh blocks staying zero through training, its layer
(shapes, state widths), its config key's errors through the CLI, exact resume and a CLI run."""

from __future__ import annotations

import math
import tomllib

import pytest
import torch
from helpers import TINY_WORD, assert_config_refused, cli, evaluate_and_generate, ok, resume_matches_straight, sets, write_small_corpus

from lmtrain.config import ModelConfig, load_config
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel, get_cell, layer_class, load_run, model_shapes, state_widths
from lmtrain.model.cells import clockwork
from lmtrain.model.kernels import dispatch

F64 = torch.float64


def inputs(periods, steps=7, batch=3, input_size=5, hidden=8, dtype=F64, seed=0, counter=(0, 3, 5)):
    """x, the state (h, t), w_ih, w_hh (full: the run masks it), b_ih; all leaves but t, which is
    each stream's step counter (streams may be at different steps)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, scale=0.5: (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()  # noqa: E731
    t = torch.tensor(counter[:batch], dtype=dtype).view(batch, 1) % math.lcm(*periods)
    return (r(steps, batch, input_size, scale=1.0), (r(batch, hidden), t), r(hidden, input_size), r(hidden, hidden),
            r(hidden))


def outputs_and_grads(run, args, periods, seed=1):
    """y, the final (h, t) and the gradient of a random weighting of y and h at x, h_0, w_ih, w_hh, b_ih."""
    x, (h, t), w_ih, w_hh, b_ih = args
    y, (h_out, t_out) = run(x, (h, t), w_ih, w_hh, b_ih, periods)
    assert not t_out.requires_grad and t_out.dtype == t.dtype and t_out.shape == t.shape
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (y, h_out))
    return [y, h_out, t_out, *torch.autograd.grad(loss, [x, h, w_ih, w_hh, b_ih])]


def worst(got, want):
    assert len(got) == len(want)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(got, want))
    return max(((a - b).abs().max() / max(1.0, b.abs().max().item())).item() for a, b in zip(got, want))


# (periods, hidden): the paper's exponential series, periods that do not divide one another,
# equal periods, one module (the rnn)
PERIOD_SETS = [((1, 2, 4, 8), 8), ((1, 3), 6), ((2, 2, 5), 6), ((1,), 4)]


@pytest.mark.parametrize("periods, hidden", PERIOD_SETS)
@pytest.mark.parametrize("steps", [1, 7])
def test_the_fast_path_computes_what_the_reference_computes(periods, hidden, steps):
    args = inputs(periods, steps=steps, hidden=hidden)
    got = outputs_and_grads(clockwork.run, args, periods)
    want = outputs_and_grads(clockwork.reference, args, periods)
    assert torch.equal(got[2], want[2])  # the counter
    assert torch.equal(got[2], (args[1][1] + steps) % math.lcm(*periods))
    assert worst(got, want) <= 1e-12
    assert all(g.abs().max() > 0 for g in got[3:])  # every leaf gets a gradient
    masked = ~clockwork.recurrent_mask(periods, hidden)
    assert (got[6][masked] == 0).all() and (want[6][masked] == 0).all()  # nothing reaches W_hh's masked blocks


def test_gradcheck_with_state_in_and_out():
    periods = (1, 2, 3)
    x, (h, t), w_ih, w_hh, b_ih = inputs(periods, steps=5, batch=2, input_size=3, hidden=3, seed=4, counter=(1, 4))

    def run(x, h, w_ih, w_hh, b_ih):
        y, (h_out, _) = clockwork.run(x, (h, t), w_ih, w_hh, b_ih, periods)
        return y, h_out

    assert torch.autograd.gradcheck(run, (x, h, w_ih, w_hh, b_ih))


def test_windows_in_turn_are_one_long_window():
    """Windows of 3, 4 and 3 steps, each from the one before's final (h, t): the whole sequence's
    outputs, final state and gradients (windows that are no multiple of the periods)."""
    periods = (1, 2, 4)
    args = inputs(periods, steps=10, hidden=6, seed=5, counter=(0, 1, 2))

    def in_turn(x, state, w_ih, w_hh, b_ih, periods):
        ys = []
        for part in (x[:3], x[3:7], x[7:]):
            y, state = clockwork.run(part, state, w_ih, w_hh, b_ih, periods)
            ys.append(y)
        return torch.cat(ys), state

    got, want = outputs_and_grads(in_turn, args, periods), outputs_and_grads(clockwork.run, args, periods)
    assert torch.equal(got[2], want[2]) and worst(got, want) <= 1e-14


@pytest.mark.parametrize("start", [0, 3])
def test_a_module_updates_only_at_the_steps_its_period_divides(start):
    periods, hidden, steps = (1, 2, 4, 8), 8, 17
    x, (h, t), w_ih, w_hh, b_ih = inputs(periods, steps=steps, batch=1, hidden=hidden, seed=6, counter=(start,))
    with torch.no_grad():
        y, _ = clockwork.run(x, (h, t), w_ih, w_hh, b_ih, periods)
    before = torch.cat([h.detach().unsqueeze(0), y[:-1]])  # h_{t-1} of each step
    for i, period in enumerate(periods):
        units = slice(2 * i, 2 * i + 2)
        for s in range(steps):
            changed = not torch.equal(y[s, :, units], before[s, :, units])
            assert changed == ((start + s) % period == 0), (period, s)


def test_slow_modules_feed_fast_ones_and_not_the_other_way():
    """Module i reads module j's state only if T_j >= T_i: the slowest module's outputs do not
    depend on the fast modules' state, the fastest's depend on every module's."""
    periods = (1, 2, 4, 8)
    x, (h, t), w_ih, w_hh, b_ih = inputs(periods, steps=12, batch=1, hidden=8, seed=7, counter=(0,))
    y, _ = clockwork.run(x, (h, t), w_ih, w_hh, b_ih, periods)
    fastest, slowest = y[:, :, :2].sum(), y[:, :, 6:].sum()
    (from_slowest,) = torch.autograd.grad(slowest, h, retain_graph=True)
    (from_fastest,) = torch.autograd.grad(fastest, h)
    assert (from_slowest[:, :6] == 0).all() and (from_slowest[:, 6:] != 0).all()
    assert all((from_fastest[:, 2 * i : 2 * i + 2] != 0).any() for i in range(4))
    mask = clockwork.recurrent_mask(periods, 8)
    assert mask[0].all() and mask[:, 0].sum() == 2 and mask[6:, :6].any().item() is False  # rows receive


def test_one_module_of_period_1_is_the_rnn():
    """Periods "1": every unit updates every step from every unit, our rnn on the same weights."""
    torch.manual_seed(0)
    rnn = LanguageModel(config(cell="rnn"), 11).double()
    ours = LanguageModel(config(clockwork_periods="1"), 11).double()
    ours.load_state_dict(rnn.state_dict())
    tokens = torch.randint(0, 11, (9, 3))
    results = []
    for model in (rnn, ours):
        logits, state = model(tokens, model.init_state(3))
        (logits * torch.linspace(-1, 1, 11, dtype=F64)).sum().backward()
        results.append((logits, [s[0] for s in state], [p.grad for p in model.parameters()]))
    (a, ha, ga), (b, hb, gb) = results
    assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert all(torch.allclose(x, y, atol=1e-12, rtol=0) for x, y in zip(ha + ga, hb + gb))


def test_bench_times_it_beside_the_rnn_against_torch_nn_rnn():
    from lmtrain.tools.bench import reference_name, with_baselines

    assert with_baselines(["clockwork"]) == ["clockwork", "rnn"]
    assert reference_name("clockwork") == "torch.nn.RNN"


def config(**changes) -> ModelConfig:
    return ModelConfig(**{"cell": "clockwork", "layers": 2, "embedding_size": 6, "hidden_size": 8, "dropout": 0.0} | changes)


def test_the_layer_its_shapes_and_its_state():
    c = config(clockwork_periods="1,2")
    model = LanguageModel(c, 11)
    layer = model.layers[0]
    assert type(layer) is layer_class(get_cell("clockwork")) is clockwork.Layer
    assert not dispatch.on_engine(get_cell("clockwork"))
    assert layer.periods == (1, 2)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {"w_ih": (8, 6), "w_hh": (8, 8), "b_ih": (8,)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model_shapes(c, 11)
    assert state_widths(c) == [{"h": 8, "t": 1}, {"h": 8, "t": 1}]
    state = model.init_state(2)
    assert [[tuple(s.shape) for s in layer_state] for layer_state in state] == [[(2, 8), (2, 1)]] * 2
    assert all((s == 0).all() for layer_state in state for s in layer_state)
    logits, final = model(torch.randint(0, 11, (5, 2)), state)
    assert logits.shape == (5, 2, 11) and all(torch.equal(t, torch.ones(2, 1)) for _, t in final)  # 5 mod 2
    for layer in model.layers:  # the stored W_hh is itself block-upper-triangular
        assert (layer.w_hh[~clockwork.recurrent_mask((1, 2), 8)] == 0).all()
        assert (layer.w_hh[clockwork.recurrent_mask((1, 2), 8)] != 0).all()


def test_modules_that_do_not_divide_the_units_split_them_first_ones_wider():
    """10 units in 4 modules: 3, 3, 2, 2; the mask and the clocks follow those sizes, and the fast
    path is still the reference (outputs, state and every gradient)."""
    assert clockwork.module_sizes(4, 10) == [3, 3, 2, 2] and clockwork.module_sizes(4, 650) == [163, 163, 162, 162]
    assert clockwork.unit_periods((1, 2, 4, 8), 10).tolist() == [1, 1, 1, 2, 2, 2, 4, 4, 8, 8]
    mask = clockwork.recurrent_mask((1, 2, 4, 8), 10)
    assert mask[0].all() and not mask[9, :8].any() and mask[9, 8:].all()  # the slowest module reads only itself
    torch.manual_seed(0)
    periods = (1, 2, 4, 8)
    x = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    state = (h, torch.full((2, 1), 3.0, dtype=torch.float64))
    w = [(torch.rand(shape, dtype=torch.float64) - 0.5).requires_grad_() for shape in ((10, 3), (10, 10), (10,))]
    y_ref, (h_ref, t_ref) = clockwork.reference(x, state, *w, periods)
    y, (h_fast, t_fast) = clockwork.run(x, state, *w, periods)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_fast, h_ref, rtol=0, atol=1e-12)
    assert torch.equal(t_fast, t_ref)
    wrt = [x, h, *w]
    for a, b in zip(torch.autograd.grad((y * y_ref.detach()).sum() + h_fast.sum(), wrt),
                    torch.autograd.grad((y_ref * y_ref.detach()).sum() + h_ref.sum(), wrt)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    model = LanguageModel(config(clockwork_periods="1,2,4"), 11)  # 3 modules of 8 units: 3, 3, 2
    assert (model.layers[0].w_hh[~clockwork.recurrent_mask((1, 2, 4), 8)] == 0).all()
    assert clockwork.module_sizes(3, 8) == [3, 3, 2]


def test_more_modules_than_units_is_refused_in_building_too():
    with pytest.raises(LmtrainError, match="config key 'model.clockwork_periods' gives 5 modules, more than a clockwork layer's 4 units"):
        clockwork.module_sizes(5, 4)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_masked_w_hh_entries_stay_zero_through_training_steps(optimizer):
    """AdamW with weight decay or SGD with momentum, DropConnect, bf16 products: after steps the
    masked blocks are still exactly zero and the others have moved."""
    torch.manual_seed(0)
    model = LanguageModel(config(weight_drop=0.3), 11)
    before = [layer.w_hh.detach().clone() for layer in model.layers]
    make = {"adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1)}[optimizer]
    opt = make(model.parameters())
    mask = clockwork.recurrent_mask((1, 2, 4, 8), 8)
    for precision in (None, torch.bfloat16, None):
        tokens = torch.randint(0, 11, (7, 3))
        logits, _ = model(tokens[:-1], model.init_state(3), precision)
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[1:].flatten()).backward()
        assert all((layer.w_hh.grad[~mask] == 0).all() for layer in model.layers)
        opt.step()
        opt.zero_grad()
    for layer, old in zip(model.layers, before):
        assert (layer.w_hh[~mask] == 0).all()
        assert (layer.w_hh[mask] != old[mask]).all()


def test_weight_drop_is_one_mask_for_the_window_in_training_only():
    torch.manual_seed(0)
    layer = LanguageModel(config(), 11).layers[1].double()
    x = torch.randn(5, 3, 8, dtype=F64)
    state = layer.init_state(3, x)
    layer.eval()
    y_eval, _ = layer(x, state, weight_drop=0.5)
    y_ref, _ = clockwork.reference(x, state, layer.w_ih, layer.w_hh, layer.b_ih, layer.periods)
    assert torch.allclose(y_eval, y_ref, atol=1e-13)
    layer.train()
    torch.manual_seed(1)
    y_train, _ = layer(x, state, weight_drop=0.5)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(layer.w_hh.detach(), 0.5, True)
    y_mask, _ = clockwork.reference(x, state, layer.w_ih, dropped, layer.b_ih, layer.periods)
    assert torch.allclose(y_train, y_mask, atol=1e-13) and not torch.allclose(y_train, y_eval)


def test_mixed_precision_rounds_the_products_operands_and_keeps_float32():
    periods = (1, 2)
    args = inputs(periods, steps=5, batch=4, input_size=12, hidden=10, dtype=torch.float32, seed=8, counter=(0, 1, 2, 3))
    low = outputs_and_grads(lambda *a: clockwork.run(*a, compute_dtype=torch.bfloat16), args, periods)
    full = outputs_and_grads(clockwork.run, args, periods)
    assert worst(low[:2], full[:2]) > 1e-4 and worst(low, full) <= 5e-2
    assert all(a.dtype == torch.float32 and torch.isfinite(a).all() for a in low)


def test_the_periods_read_as_toml_lists_and_strings(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\ncell = "clockwork"\nhidden_size = 16\nclockwork_periods = [1, 2, 4, 16]\n')
    assert load_config(toml).model.periods == (1, 2, 4, 16)
    assert load_config(None, ["model.clockwork_periods=1, 3"]).model.clockwork_periods == "1,3"
    assert load_config(None, ["model.clockwork_periods=5"]).model.periods == (5,)
    # the periods need not divide the units of layers that are not clockwork
    assert load_config(None, ["model.cell=lstm", "model.hidden_size=5"]).model.periods == (1, 2, 4, 8)


@pytest.mark.parametrize("items, fragment", [
    (["model.clockwork_periods=0,1"], "config key 'model.clockwork_periods' must be positive integers, comma-separated (1,2,4,8), got '0,1'"),
    (["model.clockwork_periods=1,-2"], "must be positive integers, comma-separated (1,2,4,8), got '1,-2'"),
    (["model.clockwork_periods=1,4,2,8"], "config key 'model.clockwork_periods' must be in non-decreasing order (modules sorted by period), got '1,4,2,8'"),
    (["model.clockwork_periods=" + ",".join(["1"] * 17)], "config key 'model.clockwork_periods' gives 17 modules, more than a clockwork layer's units: model.hidden_size is 16"),
    (["model.tie_weights=true", "model.embedding_size=3"],
     "gives 4 modules, more than a clockwork layer's units: model.embedding_size (the tied last layer's units) is 3"),
    (["model.clockwork_periods=fast"], "must be positive integers, comma-separated (1,2,4,8), got 'fast'"),
    (["model.clockwork_periods=1,,2"], "got '1,,2'"),
    (["model.clockwork_periods=1.5,2"], "got '1.5,2'"),
    (["model.clockwork_periods="], "got ''"),
    (["model.clockwork_periods=3,16777216"], "the periods' least common multiple must be at most 16,777,216 (the step counter is kept modulo it), got 50,331,648"),
])
def test_bad_values_are_one_error_line_naming_the_key(items, fragment, tmp_path):
    items = ["model.cell=clockwork", "model.hidden_size=16", *items]
    assert_config_refused(tmp_path, [*TINY_WORD, *items], fragment, "model.clockwork_periods")


CLOCKWORK = [*TINY_WORD, "model.layers=2", "model.cell=clockwork", "train.log_interval=3"]


def test_resume_continues_exactly(tmp_path):
    """Periods whose cycle (105) the steps stopped at (4 windows of 12) do not complete, so the
    resumed run must take the carried counter from the checkpoint to continue as the straight one."""
    def counters_are_off_the_cycle(run):
        hidden = torch.load(run / "last.pt", weights_only=True)["resume"]["hidden"]
        assert all(tuple(t.shape) == (4, 1) and (t % 105 != 0).all() for _, t in hidden)

    keys = [*CLOCKWORK, "model.clockwork_periods=1,3,5,7", "train.optimizer=adamw", "train.lr=0.003"]
    resume_matches_straight(tmp_path, keys, counters_are_off_the_cycle)


def test_train_evaluate_and_generate_through_the_cli(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*CLOCKWORK, "model.clockwork_periods=1,2,4,8",
                                                     "model.weight_drop=0.2", "train.max_steps=6")))
    saved = tomllib.loads((run / "config.toml").read_text())["model"]
    assert (saved["cell"], saved["clockwork_periods"]) == ("clockwork", "1,2,4,8")
    loaded = load_run(run, torch.device("cpu")).model
    mask = clockwork.recurrent_mask((1, 2, 4, 8), 16)
    assert all((layer.w_hh[~mask] == 0).all() for layer in loaded.layers)  # trained, still masked
    evaluate_and_generate(run)


def test_export_refuses_it_by_name():
    from lmtrain.config import Config
    from lmtrain.model import onnx_bytes, torch_lstm_payload

    model = LanguageModel(config(), 11)
    with pytest.raises(LmtrainError, match="this run has clockwork layers"):
        torch_lstm_payload(Config(model=config()), model.state_dict())
    pytest.importorskip("onnx")
    with pytest.raises(LmtrainError, match="does not cover the clockwork cell"):
        onnx_bytes(model)
