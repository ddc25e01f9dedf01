"""Zoneout (model.zoneout_hidden, model.zoneout_cell; lmtrain/model/zoneout.py): every cell's layer
against the plain-autograd reference with the same masks (float64: outputs, final state, every
gradient), in training and at evaluation (the expectation), gradcheck through the engine with fixed
masks, masks that keep exactly the previous values, p = 0 as the plain layer on its fast path,
dispatch that never takes a path without zoneout, generation, exports, exact resume, config errors
and a CLI run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import TINY_WORD, assert_config_refused, cli, evaluate_and_generate, ok, resume_matches_straight, sets, write_small_corpus

from lmtrain.config import Config, ModelConfig
from lmtrain.config_rules import H_ONLY_CELLS
from lmtrain.errors import LmtrainError
from lmtrain.generation.stepper import Stepper
from lmtrain.model import CELLS, LanguageModel, dispatch, get_cell, layer_class, stack_forward
from lmtrain.model import zoneout
from lmtrain.model.kernels.dispatch import on_engine
from lmtrain.model.layer import is_standard
from lmtrain.model.recurrence import Recurrence, run_layer

F64 = torch.float64
STEPS, BATCH, INPUTS, HIDDEN = 6, 3, 4, 3


def has_cell_state(name: str) -> bool:
    return "c" in get_cell(name).STATE


# every cell, and the qrnn with its window of 2 (x_prev in its state, not zoned)
# the clockwork cell's modules must divide HIDDEN: three of one unit each
KEYS = {"clockwork": {"clockwork_periods": "1,2,3"}}
CASES = [(name, KEYS.get(name, {})) for name in CELLS] + [("qrnn", {"qrnn_window": 2})]
CASE_IDS = [name + ("-window2" if "qrnn_window" in keys else "") for name, keys in CASES]


def own_references(layer):
    """A layer of its own's plain-autograd window, (x, state) -> y, new state, by its cell."""
    cell = layer.cell
    return {
        "mogrifier": lambda x, s: cell.reference(x, s, layer.w_ih, layer.w_hh, layer.b_ih, layer.parameters_of_rounds()),
        "qrnn": lambda x, s: cell.reference(x, s, layer.w_ih, layer.b_ih, getattr(layer, "window", 1)),
        "dglstm": lambda x, s: cell.reference(x, None, s, layer.w_ih, layer.w_hh, layer.b_ih)[::2],
        "clockwork": lambda x, s: cell.reference(x, s, layer.w_ih, layer.w_hh, layer.b_ih, getattr(layer, "periods", ())),
    }


def reference_window(layer):
    """The layer's cell's plain-autograd reference over a window, (x, state) -> y, new state."""
    cell = layer.cell
    if on_engine(cell):
        return lambda x, s: cell.reference(x, s, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, tuple(layer.extra))
    return own_references(layer)[dispatch.cell_name(cell)]


def make_layer(name: str, keys: dict, hidden: float = 0.0, cell_p: float = 0.0, seed: int = 0):
    """A float64 layer of `name` with zoneout p's, its parameters uniform in ±0.5 (drawn from `seed`)."""
    config = ModelConfig(cell=name, layers=1, embedding_size=INPUTS, hidden_size=HIDDEN, mogrifier_rounds=3,
                         zoneout_hidden=hidden, zoneout_cell=cell_p, **keys)
    cell = get_cell(name)
    layer = layer_class(cell)(cell, INPUTS, HIDDEN, config).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=F64) - 0.5)
    return layer


def window_inputs(layer, seed=1):
    """x (T, B, I) and a random initial state of the layer's widths (the slstm's n positive), all
    requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, BATCH, INPUTS, generator=g, dtype=F64).requires_grad_()
    zeros = layer.init_state(BATCH, x)
    state = tuple(torch.full(z.shape, 5.0, dtype=F64) if name == "t" else  # the clockwork's step counter: a whole number
                  (torch.rand(z.shape, generator=g, dtype=F64) + (0.5 if name == "n" else -0.5)).requires_grad_()
                  for name, z in zip(layer.state_names, zeros))
    return x, state


def grads_of(outputs, inputs, seed=2):
    """Gradients of a random weighting of all outputs, so every output's gradient path is used."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def assert_close(ours, refs, atol=1e-12):
    assert len(ours) == len(refs)
    for k, (a, b) in enumerate(zip(ours, refs)):
        assert a is not None and b is not None and a.shape == b.shape, k
        assert (a - b).abs().max().item() <= atol, (k, (a - b).abs().max().item())


def p_for(name: str) -> tuple[float, float]:
    return 0.5, 0.4 if has_cell_state(name) else 0.0


def test_the_config_knows_which_cells_have_no_c():
    assert set(H_ONLY_CELLS) == {name for name in CELLS if not has_cell_state(name)}


def test_every_own_layer_has_a_reference_here():
    own = {name for name, cell in CELLS.items() if not on_engine(cell)}
    assert own <= set(own_references(SimpleNamespace(cell=None)))


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("name, keys", CASES, ids=CASE_IDS)
def test_the_layer_computes_what_the_reference_computes(name, keys, training):
    """The same masks (training) or the expectation (evaluation): outputs, final state and the
    gradient of x, of the initial state and of every parameter, float64 to 1e-12; and not what the
    layer without zoneout computes (no path may ignore it)."""
    layer = make_layer(name, keys, *p_for(name)).train(training)
    x, state = window_inputs(layer)
    torch.manual_seed(7)
    y, final, _ = stack_forward(layer, x, state, None)
    torch.manual_seed(7)
    zone = layer.zone(x)
    assert zone is not None and isinstance(zone.keep[0], float) != training
    y_ref, final_ref, _ = zoneout.reference(reference_window(layer), x, state, zone.keep, zone.scaled)
    assert_close([y, *final], [y_ref, *final_ref])
    wrt = [x, *(s for s in state if s.requires_grad), *layer.parameters()]  # not the clockwork's counter
    outputs = [y, *(s for s in final if s.requires_grad)]
    assert_close(grads_of(outputs, wrt), grads_of([y_ref, *(s for s in final_ref if s.requires_grad)], wrt))

    plain = make_layer(name, keys).train(training)
    y_plain, _, _ = stack_forward(plain, x, state, None)
    assert (y - y_plain).abs().max() > 1e-3


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_a_depth_gated_stack_hands_up_the_zoned_cells(training):
    """Two dglstm layers (the upper one depth-gated): the lower hands up its zoned c, the upper
    reads it; both against the reference stack, every gradient."""
    config = ModelConfig(cell="dglstm", layers=2, embedding_size=INPUTS, hidden_size=INPUTS, zoneout_hidden=0.3, zoneout_cell=0.5)
    model = LanguageModel(config, 5).double().train(training)
    lower, upper = model.layers
    x, _ = window_inputs(lower)
    states = [tuple(torch.rand(BATCH, INPUTS, dtype=F64).requires_grad_() for _ in range(2)) for _ in range(2)]
    torch.manual_seed(3)
    y1, final1, up1 = stack_forward(lower, x, states[0], None)
    y2, final2, _ = stack_forward(upper, y1, states[1], up1)
    torch.manual_seed(3)
    zone1 = lower.zone(x)
    zone2 = upper.zone(x)
    cell = lower.cell
    depth = tuple(getattr(upper, name) for name in cell.DEPTH)
    y1_ref, final1_ref, carried1 = zoneout.reference(
        lambda x, s: cell.reference(x, None, s, lower.w_ih, lower.w_hh, lower.b_ih)[::2], x, states[0], zone1.keep)
    y2_ref, final2_ref, _ = zoneout.reference(
        lambda x, s, low: cell.reference(x, low, s, upper.w_ih, upper.w_hh, upper.b_ih, depth)[::2],
        y1_ref, states[1], zone2.keep, lower=carried1[1])
    assert_close([up1], [carried1[1]])
    outs, refs = [y2, *final1, *final2], [y2_ref, *final1_ref, *final2_ref]
    assert_close(outs, refs)
    wrt = [x, *states[0], *states[1], *lower.parameters(), *upper.parameters()]
    assert_close(grads_of(outs, wrt), grads_of(refs, wrt))


def engine_inputs(cell, seed=3, steps=3, batch=2, hidden=2):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return (torch.randn(*shape, generator=g, dtype=F64) * 0.5).requires_grad_()

    width = cell.GATES * hidden
    x = leaf(steps, batch, 3)
    state = tuple((torch.rand(batch, hidden, generator=g, dtype=F64) + 0.5).requires_grad_() if name == "n"
                  else leaf(batch, hidden) for name in cell.STATE)
    weights = [leaf(width, 3), leaf(width, hidden), leaf(width)] + ([leaf(width)] if cell.RECURRENT_BIAS else [])
    extra = [leaf(blocks * hidden) for blocks in cell.EXTRA.values()]
    return x, state, weights, extra


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
@pytest.mark.parametrize("name", [name for name, cell in CELLS.items() if on_engine(cell)])
def test_gradcheck_through_the_engine_with_state_in_and_out(name, training):
    """The engine's hand-written backward with zoneout, fixed masks (or the expectation; the
    slstm's scaled one among them)."""
    cell = get_cell(name)
    x, state, weights, extra = engine_inputs(cell)
    probabilities = zoneout.probabilities(cell, cell.STATE, SimpleNamespace(zoneout_hidden=0.5,
                                                                            zoneout_cell=0.5 if has_cell_state(name) else 0.0))
    torch.manual_seed(0)
    zone = zoneout.draw(probabilities, cell.STATE, cell, x, 2, training)
    has_b_hh = cell.RECURRENT_BIAS

    def run(x, *rest):
        w_ih, w_hh, b_ih, *rest = rest
        b_hh, rest = (rest[0], rest[1:]) if has_b_hh else (None, rest)
        return Recurrence.apply(zoneout.Zoned(cell, zone), len(state), None, x, w_ih, w_hh, b_ih, b_hh, *rest)

    assert torch.autograd.gradcheck(run, (x, *weights, *state, *extra))


def test_the_slstms_expectation_is_that_of_its_unscaled_cell():
    """At evaluation the slstm's (c, n, m) mix as c·e^m and n·e^m: the carried state stands for
    p·(its old value) + (1 − p)·(its new one), whatever the scales; and at a tie of the scales
    (the max's gradient split) gradcheck still holds."""
    g = torch.Generator().manual_seed(0)
    prev = [torch.randn(2, 3, generator=g, dtype=F64) for _ in range(2)]
    new = [torch.randn(2, 3, generator=g, dtype=F64) for _ in range(2)]
    mu_prev, mu_new = torch.randn(2, 3, generator=g, dtype=F64) * 5, torch.randn(2, 3, generator=g, dtype=F64) * 5
    c, n, mu = zoneout.expect_scaled(0.3, prev, mu_prev, new, mu_new)
    for k, mixed in enumerate((c, n)):
        want = 0.3 * prev[k] * mu_prev.exp() + 0.7 * new[k] * mu_new.exp()
        torch.testing.assert_close(mixed * mu.exp(), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(mu, torch.maximum(mu_prev, mu_new))
    mu_new = mu_prev.clone()  # every scale tied
    leaves = [t.clone().requires_grad_() for t in (*prev, mu_prev, *new, mu_new)]
    outs = zoneout.expect_scaled(0.3, leaves[:2], leaves[2], leaves[3:5], leaves[5])
    d = [torch.randn(2, 3, generator=g, dtype=F64) for _ in range(3)]
    auto = torch.autograd.grad(outs, leaves, d)
    ours = zoneout.expect_scaled_backward(0.3, leaves[:2], leaves[2], leaves[3:5], leaves[5], d[:2], d[2])
    (dc_p, dc_n), (dn_p, dn_n), (dmu_p, dmu_n) = ours
    assert_close([dc_p, dn_p, dmu_p, dc_n, dn_n, dmu_n], list(auto))


def test_training_masks_keep_exactly_the_previous_values():
    """Where m = 1 a unit's h (the output) and c are bit for bit those of the step before; the
    slstm keeps its c, n and m together; elsewhere the unit moves. Step by step, each step a window
    of one with that step's masks."""
    for name in ("lstm", "slstm", "qrnn"):
        layer = make_layer(name, {}, 0.5, 0.5).train()
        x, state = window_inputs(layer)
        torch.manual_seed(11)
        zone = layer.zone(x)
        assert all(k is not None for k in zone.keep[:2])
        if name == "slstm":
            assert all(zone.keep[k] is zone.keep[1] for k in (1, 2, 3))
        y_window, _ = run_window_with(layer, x, state, zone)
        for t in range(STEPS):
            step = zoneout.Zone(tuple(k[t : t + 1] if isinstance(k, torch.Tensor) else k for k in zone.keep), zone.scaled)
            y, new = run_window_with(layer, x[t : t + 1], state, step)
            assert torch.equal(y[0], new[0])
            for k, state_name in enumerate(layer.state_names):
                if zone.keep[k] is None:
                    assert torch.equal(new[k], x[t]), state_name  # the qrnn's x_prev: this step's input
                    continue
                kept = zone.keep[k][t]
                assert kept.any() and (~kept).any()
                assert torch.equal(new[k][kept], state[k][kept]), state_name
                assert (new[k][~kept] != state[k][~kept]).all(), state_name
            state = new
        torch.testing.assert_close(y_window[-1], state[0], rtol=0, atol=1e-12)


def run_window_with(layer, x, state, zone):
    """The layer's window with a given Zone (its own draw replaced)."""
    layer.zone = lambda _: zone
    try:
        y, final, _ = stack_forward(layer, x, state, None)
    finally:
        del layer.zone
    return y, final


def test_evaluation_is_the_expectation_and_draws_nothing():
    layer = make_layer("lstm", {}, 0.3, 0.2).eval()
    x, state = window_inputs(layer)
    before = torch.get_rng_state()
    y, final, _ = stack_forward(layer, x, state, None)
    assert torch.equal(torch.get_rng_state(), before)
    zone = layer.zone(x)
    assert zone.keep == (0.3, 0.2)
    y_ref, _, _ = zoneout.reference(reference_window(layer), x, state, (0.3, 0.2))
    assert_close([y], [y_ref])
    assert torch.equal(stack_forward(layer, x, state, None)[0], y)


@pytest.mark.parametrize("name", list(CELLS))
def test_p_zero_is_the_plain_layer_on_its_own_path(name):
    """zoneout_hidden = zoneout_cell = 0: no Zone, no draw, bit for bit the layer without the keys,
    on the path it took before (the lstm's sequence kernel)."""
    torch.manual_seed(0)
    keys = KEYS.get(name, {})
    plain = LanguageModel(ModelConfig(cell=name, embedding_size=6, hidden_size=6, **keys), 9).train()
    torch.manual_seed(0)
    zeros = LanguageModel(ModelConfig(cell=name, embedding_size=6, hidden_size=6, zoneout_hidden=0.0, zoneout_cell=0.0,
                                      **keys), 9).train()
    tokens = torch.randint(0, 9, (5, 2))
    assert all(layer.zone(torch.zeros(5, 2, 6)) is None for layer in zeros.layers)
    assert all(is_standard(a) == is_standard(b) for a, b in zip(plain.layers, zeros.layers))
    torch.manual_seed(1)
    a, _ = plain(tokens, plain.init_state(2))
    torch.manual_seed(1)
    b, _ = zeros(tokens, zeros.init_state(2))
    assert torch.equal(a, b)


def test_dispatch_never_takes_a_path_without_zoneout(monkeypatch):
    """The lstm's sequence kernel (its C++ loop) does not know zoneout: a zoned call takes the
    engine, on the CPU, and with LMTRAIN_FUSED=1 the fused loop (which runs the engine's loop)."""
    cell = get_cell("lstm")
    x, state, (w_ih, w_hh, b_ih), _ = engine_inputs(cell)
    args = (x, state, w_ih, w_hh, b_ih, None, ())
    assert dispatch.choose(cell, *args, compute_dtype=None).path == "sequence"
    assert dispatch.choose(cell, *args, compute_dtype=None, zoneout=True).path == "engine"
    monkeypatch.setenv("LMTRAIN_FUSED", "1")
    monkeypatch.setenv("LMTRAIN_FUSED_MODE", "eager")
    assert dispatch.choose(cell, *args, compute_dtype=None, zoneout=True).path == "fused"
    torch.manual_seed(0)
    zone = zoneout.draw((0.5, 0.5), cell.STATE, cell, x, 2, True)
    fused = run_layer(cell, *args, zoneout=zone)
    monkeypatch.setenv("LMTRAIN_FUSED", "0")
    engine = run_layer(cell, *args, zoneout=zone)
    assert_close([fused[0], *fused[1]], [engine[0], *engine[1]], atol=0.0)
    with pytest.raises(ValueError, match="does not apply zoneout"):
        from lmtrain.model.recurrence import run_path

        run_path("sequence", cell, args, None, zone)


def test_generation_steps_the_expectation():
    """The stepper runs a zoned layer through its forward (not the plain step's weights): its
    logits, token by token, are the model's at evaluation over the whole sequence."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(cell="lstm,gru", embedding_size=6, hidden_size=6, zoneout_hidden=0.2), 9).eval()
    stepper = Stepper(model)
    assert stepper.own[0] is not None and stepper.stack is None
    tokens = torch.randint(0, 9, (5, 2))
    with torch.no_grad():
        want, _ = model(tokens, model.init_state(2))
    state = model.init_state(2)
    for t in range(5):
        logits, state = stepper.step(tokens[t], state)
        torch.testing.assert_close(logits, want[t], rtol=1e-5, atol=1e-6)


def test_exports_refuse_zoneout():
    from lmtrain.model import onnx_bytes, torch_lstm_payload

    config = ModelConfig(zoneout_cell=0.1)
    model = LanguageModel(config, 11)
    with pytest.raises(LmtrainError, match=r"cannot carry zoneout \(model.zoneout_cell = 0.1\)"):
        torch_lstm_payload(Config(model=config), model.state_dict())
    with pytest.raises(LmtrainError, match=r"does not cover zoneout \(model.zoneout_cell\)"):
        onnx_bytes(model)


ZONED = [*TINY_WORD, "model.zoneout_hidden=0.2", "model.zoneout_cell=0.3", "train.log_interval=3"]


def test_resume_continues_exactly(tmp_path):
    resume_matches_straight(tmp_path, [*ZONED, "train.optimizer=adamw", "train.lr=0.003"])


@pytest.mark.parametrize("items, fragment", [
    (["model.zoneout_hidden=1.0"], "config key 'model.zoneout_hidden' must be in [0, 1), got 1.0"),
    (["model.zoneout_hidden=-0.1"], "config key 'model.zoneout_hidden' must be in [0, 1), got -0.1"),
    (["model.zoneout_cell=1.5"], "config key 'model.zoneout_cell' must be in [0, 1), got 1.5"),
    (["model.zoneout_cell=yes"], "config key 'model.zoneout_cell' must be float, got 'yes'"),
    (["model.cell=gru", "model.zoneout_cell=0.1"],
     "config key 'model.zoneout_cell' needs a cell with a c state; the gru cell has only h (use model.zoneout_hidden)"),
    (["model.cell=lstm,rnn,gru", "model.layers=3", "model.zoneout_cell=0.1"],
     "config key 'model.zoneout_cell' needs a cell with a c state; the gru, rnn cells have only h"),
])
def test_bad_values_are_one_error_line_naming_the_key(items, fragment, tmp_path):
    assert_config_refused(tmp_path, items, fragment, "model.zoneout_")


@pytest.mark.parametrize("cell", ["lstm", "gru", "dglstm"])
def test_train_evaluate_and_generate_through_the_cli(cell, tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    keys = [*ZONED, f"model.cell={cell}", "model.layers=2", "train.max_steps=6"]
    if not has_cell_state(cell):
        keys.remove("model.zoneout_cell=0.3")
    ok(cli("train", corpus, "--run-dir", run, *sets(*keys)))
    evaluate_and_generate(run)
