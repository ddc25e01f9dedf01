"""Every cell on the one engine: gradcheck, the engine against the cell's plain-autograd reference,
lstm/gru/rnn against torch.nn, cross-checks between cells, and per-layer cells in the model and config."""

import pytest
import torch
import torch.nn.functional as F

from lmtrain import config as config_module
from lmtrain.config import ModelConfig, load_config
from lmtrain.errors import LmtrainError
from lmtrain.model.cells import CELLS, coupled, lstm, peephole, slstm
from lmtrain.model.kernels.dispatch import on_engine
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.layer import RecurrentLayer, layer_class
from lmtrain.model.recurrence import Recurrence, run_layer

F64 = torch.float64
CELL_NAMES = [name for name, cell in CELLS.items() if on_engine(cell)]  # the engine's cells; the others: their own tests


def layer_inputs(cell, steps=6, batch=3, input_size=4, hidden=3, seed=0):
    """x, state, w_ih, w_hh, b_ih, b_hh (None unless the cell keeps one), extra; all require grad.

    A normaliser state (sLSTM's n) is drawn positive, as it always is in a run.
    """
    g = torch.Generator().manual_seed(seed)
    width = cell.GATES * hidden

    def randn(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_()

    x = randn(steps, batch, input_size, scale=1.0)
    state = tuple(
        (torch.rand(batch, hidden, generator=g, dtype=F64) + 0.5).requires_grad_() if name == "n" else randn(batch, hidden)
        for name in cell.STATE
    )
    w_ih, w_hh, b_ih = randn(width, input_size), randn(width, hidden), randn(width)
    b_hh = randn(width) if cell.RECURRENT_BIAS else None
    extra = tuple(randn(blocks * hidden) for blocks in cell.EXTRA.values())
    return x, state, w_ih, w_hh, b_ih, b_hh, extra


def leaves(x, state, w_ih, w_hh, b_ih, b_hh, extra):
    return [x, *state, w_ih, w_hh, b_ih] + ([b_hh] if b_hh is not None else []) + list(extra)


def grads_of(outputs, inputs, seed=1):
    """Gradients of a random weighting of all outputs, so every output's gradient path is used."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def assert_all_close(ours, refs, atol):
    assert len(ours) == len(refs)
    for k, (a, b) in enumerate(zip(ours, refs)):
        assert a.shape == b.shape, k
        assert (a - b).abs().max().item() <= atol, (k, (a - b).abs().max().item())


def test_registry_and_config_name_the_same_cells():
    assert tuple(CELLS) == config_module.CELLS
    for cell in CELLS.values():
        assert cell.STATE[0] == "h" and cell.GATES >= 1 and isinstance(cell.RECURRENT_BIAS, bool)
        assert callable(cell.reference)
        if on_engine(cell):
            assert callable(cell.forward_step) and callable(cell.backward_step)
        else:  # a cell without a STEP runs its own layer
            assert hasattr(cell, "Layer")


@pytest.mark.parametrize("name", CELL_NAMES)
def test_gradcheck_through_engine(name):
    """All state in and out, every parameter (biases, extras) requiring grad."""
    cell = CELLS[name]
    x, state, w_ih, w_hh, b_ih, b_hh, extra = layer_inputs(cell, steps=3, batch=2, input_size=3, hidden=2, seed=3)
    has_b_hh = b_hh is not None

    def run(x, w_ih, w_hh, b_ih, *rest):
        b, rest = (rest[0], rest[1:]) if has_b_hh else (None, rest)
        return Recurrence.apply(cell, len(state), None, x, w_ih, w_hh, b_ih, b, *rest)

    inputs = (x, w_ih, w_hh, b_ih, *([b_hh] if has_b_hh else []), *state, *extra)
    assert all(t.requires_grad for t in inputs)
    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_engine_matches_reference(name):
    """Outputs, final states and the gradients of every input: x, initial state, weights, biases, extras."""
    cell = CELLS[name]
    x, state, w_ih, w_hh, b_ih, b_hh, extra = inputs = layer_inputs(cell, seed=5)
    y, final = run_layer(cell, x, state, w_ih, w_hh, b_ih, b_hh, extra)
    y_ref, final_ref = cell.reference(x, state, w_ih, w_hh, b_ih, b_hh, extra)
    assert len(final) == len(final_ref) == len(cell.STATE)
    assert_all_close([y, *final], [y_ref, *final_ref], atol=1e-12)
    wrt = leaves(*inputs)
    assert_all_close(grads_of([y, *final], wrt), grads_of([y_ref, *final_ref], wrt), atol=1e-12)


@pytest.mark.parametrize("name", CELL_NAMES)
def test_two_layers_of_one_shape_share_the_engine_buffers_safely(name, monkeypatch):
    """The engine reuses its buffers (input projections, per-step products) across calls of the
    same shape: a second layer's forward must not spoil what the first keeps for its backward."""
    monkeypatch.setenv("LMTRAIN_KERNELS", "0")  # the LSTM too through the engine
    cell = CELLS[name]
    x, state, w_ih, w_hh, b_ih, b_hh, extra = first = layer_inputs(cell, input_size=3, hidden=3, seed=7)
    _, state2, w_ih2, w_hh2, b_ih2, b_hh2, extra2 = second = layer_inputs(cell, input_size=3, hidden=3, seed=8)
    y1, _ = run_layer(cell, x, state, w_ih, w_hh, b_ih, b_hh, extra)
    y2, final = run_layer(cell, y1, state2, w_ih2, w_hh2, b_ih2, b_hh2, extra2)
    r1, _ = cell.reference(x, state, w_ih, w_hh, b_ih, b_hh, extra)
    r2, final_ref = cell.reference(r1, state2, w_ih2, w_hh2, b_ih2, b_hh2, extra2)
    wrt = leaves(*first) + leaves(*second)[1:]
    assert_all_close(grads_of([y2, *final], wrt), grads_of([r2, *final_ref], wrt), atol=1e-12)


TORCH_MODULES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


@pytest.mark.parametrize("name", list(TORCH_MODULES))
def test_two_layers_match_torch_nn(name):
    """Same weights, float64, two layers: outputs, final states and every gradient within 1e-10.

    lstm and rnn keep one bias, torch's b_ih + b_hh, whose gradient equals each of torch's two;
    gru keeps both, one for one with torch's.
    """
    cell, layers, steps, batch, input_size, hidden = CELLS[name], 2, 7, 3, 5, 4
    torch.manual_seed(0)
    reference = TORCH_MODULES[name](input_size, hidden, num_layers=layers, dtype=F64)
    x = torch.randn(steps, batch, input_size, dtype=F64, requires_grad=True)
    state0 = [torch.randn(layers, batch, hidden, dtype=F64, requires_grad=True) for _ in cell.STATE]
    y_ref, final_ref = reference(x, tuple(state0) if name == "lstm" else state0[0])
    final_ref = list(final_ref) if name == "lstm" else [final_ref]

    def torch_param(kind, k):
        return getattr(reference, f"{kind}_l{k}")

    ours, ref_params, out, finals = [], [], x, []
    for k in range(layers):
        w_ih = torch_param("weight_ih", k).detach().clone().requires_grad_()
        w_hh = torch_param("weight_hh", k).detach().clone().requires_grad_()
        if cell.RECURRENT_BIAS:
            b_ih = torch_param("bias_ih", k).detach().clone().requires_grad_()
            b_hh = torch_param("bias_hh", k).detach().clone().requires_grad_()
            ours += [w_ih, w_hh, b_ih, b_hh]
        else:
            b_ih = (torch_param("bias_ih", k) + torch_param("bias_hh", k)).detach().clone().requires_grad_()
            b_hh = None
            ours += [w_ih, w_hh, b_ih, b_ih]  # our one bias against each of torch's two
        ref_params += [torch_param(kind, k) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        out, final = run_layer(cell, out, tuple(s[k] for s in state0), w_ih, w_hh, b_ih, b_hh)
        finals.append(final)
    finals = [torch.stack([f[j] for f in finals]) for j in range(len(cell.STATE))]

    assert_all_close([out, *finals], [y_ref, *final_ref], atol=1e-10)
    wrt_ours = [x, *state0] + ours
    wrt_ref = [x, *state0] + ref_params
    unique = list(dict.fromkeys(wrt_ours))  # a shared bias once (tensors hash by identity)
    by_tensor = dict(zip(unique, grads_of([out, *finals], unique)))
    assert_all_close([by_tensor[t] for t in wrt_ours], grads_of([y_ref, *final_ref], wrt_ref), atol=1e-10)


def test_peephole_with_zero_peepholes_is_the_lstm():
    x, (h0, c0), w_ih, w_hh, b, _, (p,) = layer_inputs(peephole, seed=7)
    zero = torch.zeros_like(p, requires_grad=True)
    y, (h, c) = run_layer(peephole, x, (h0, c0), w_ih, w_hh, b, None, (zero,))
    y_lstm, (h_lstm, c_lstm) = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    assert_all_close([y, h, c], [y_lstm, h_lstm, c_lstm], atol=1e-14)
    wrt = [x, h0, c0, w_ih, w_hh, b]
    *grads, d_zero = grads_of([y, h, c], wrt + [zero])
    assert_all_close(grads, grads_of([y_lstm, h_lstm, c_lstm], wrt), atol=1e-13)
    # and the peepholes do matter: they get a gradient, and nonzero ones change the output
    assert d_zero.abs().min().item() > 0
    y_p, _ = run_layer(peephole, x, (h0, c0), w_ih, w_hh, b, None, (p,))
    assert (y_p - y).abs().max().item() > 1e-3


def test_coupled_is_the_lstm_with_input_gate_one_minus_forget():
    """σ(-a) = 1 - σ(a): an LSTM whose i pre-activation is minus the f one is the coupled cell."""
    x, (h0, c0), w_ih, w_hh, b, _, _ = layer_inputs(coupled, seed=8)
    hidden = h0.size(1)
    as_lstm = [torch.cat([-w[:hidden], w]) for w in (w_ih, w_hh, b)]
    y, (h, c) = run_layer(coupled, x, (h0, c0), w_ih, w_hh, b)
    y_lstm, (h_lstm, c_lstm) = run_layer(lstm, x, (h0, c0), *as_lstm)
    assert_all_close([y, h, c], [y_lstm, h_lstm, c_lstm], atol=1e-14)
    wrt = [x, h0, c0, w_ih, w_hh, b]
    assert_all_close(grads_of([y, h, c], wrt), grads_of([y_lstm, h_lstm, c_lstm], wrt), atol=1e-13)


def slstm_unstabilised(x, h, w_ih, w_hh, b):
    """The sLSTM without its stabiliser, from c = n = 0: c̄' = σ(f̃) c̄ + e^ĩ tanh(z̃), n̄' = σ(f̃) n̄ + e^ĩ."""
    c = n = torch.zeros_like(h)
    outputs = []
    for x_t in x:
        a_i, a_f, a_z, a_o = (x_t @ w_ih.t() + h @ w_hh.t() + b).chunk(4, dim=1)
        c = torch.sigmoid(a_f) * c + torch.exp(a_i) * torch.tanh(a_z)
        n = torch.sigmoid(a_f) * n + torch.exp(a_i)
        h = torch.sigmoid(a_o) * c / n
        outputs.append(h)
    return torch.stack(outputs)


def test_slstm_from_zero_state_equals_the_unstabilised_equations():
    """m_0 = 0 with c_0 = n_0 = 0 loses nothing: h is what the equations without m give."""
    x, _, w_ih, w_hh, b, _, _ = layer_inputs(slstm, steps=8, seed=9)
    zeros = tuple(torch.zeros(x.size(1), w_hh.size(1), dtype=F64) for _ in slstm.STATE)
    y, (_, c, n, m) = run_layer(slstm, x, zeros, w_ih, w_hh, b)
    assert_all_close([y], [slstm_unstabilised(x, zeros[0], w_ih, w_hh, b)], atol=1e-12)
    assert n.min().item() > 0 and (m != 0).all()


def test_slstm_stays_finite_where_the_unstabilised_overflows():
    x, _, w_ih, w_hh, b, _, _ = layer_inputs(slstm, steps=4, seed=10)
    b = b.detach().clone()
    hidden = w_hh.size(1)
    b[:hidden] += 800.0  # e^ĩ overflows float64
    zeros = tuple(torch.zeros(x.size(1), hidden, dtype=F64) for _ in slstm.STATE)
    assert not torch.isfinite(slstm_unstabilised(x, zeros[0], w_ih, w_hh, b)).all()
    w_ih = w_ih.detach().requires_grad_()
    y, final = run_layer(slstm, x, zeros, w_ih, w_hh, b)
    (y.sum() + sum(s.sum() for s in final)).backward()
    assert torch.isfinite(y).all() and torch.isfinite(w_ih.grad).all()


def test_slstm_gradient_at_an_exact_tie_is_torch_maximums():
    """ĩ == m_0 + log σ(f̃) exactly: autograd sends half the gradient of m' each way.

    One step, because h does not depend on the stabiliser: only the final state (c, n, m) does,
    so only a tie on the last step changes any gradient.
    """
    x, (h0, c0, n0, m0), w_ih, w_hh, b, _, _ = layer_inputs(slstm, steps=1, seed=11)
    hidden = w_hh.size(1)
    x, h0, m0, b = torch.zeros_like(x), torch.zeros_like(h0), torch.zeros_like(m0), b.detach().clone()
    # x = h_0 = 0, so the pre-activations are exactly b: ĩ = b_i, f̃ = b_f
    b[:hidden] = F.logsigmoid(b[hidden : 2 * hidden])
    inputs = (x.requires_grad_(), (h0.requires_grad_(), c0, n0, m0.requires_grad_()), w_ih, w_hh, b.requires_grad_(), None, ())
    y, final = run_layer(slstm, *inputs[:2], w_ih, w_hh, b)
    y_ref, final_ref = slstm.reference(*inputs)
    wrt = leaves(*inputs)
    assert_all_close(grads_of([y, *final], wrt), grads_of([y_ref, *final_ref], wrt), atol=1e-12)


def test_model_with_a_cell_per_layer_builds_and_trains_one_step():
    names = list(CELLS)
    config = load_config(None, [f"model.cell={','.join(names)}", f"model.layers={len(names)}",
                                "model.embedding_size=6", "model.hidden_size=8"]).model  # 8: the clockwork cell's 4 modules divide it
    torch.manual_seed(0)
    model = LanguageModel(config, vocab_size=11).double()
    assert [layer.cell for layer in model.layers] == [CELLS[name] for name in names]
    state = model.init_state(3)
    assert [len(s) for s in state] == [len(CELLS[name].STATE) for name in names]
    tokens = torch.randint(0, 11, (5, 3))
    logits, new_state = model(tokens[:-1], state)
    assert [len(s) for s in new_state] == [len(CELLS[name].STATE) for name in names]
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_one_cell_name_is_used_for_every_layer():
    model = LanguageModel(ModelConfig(cell="slstm", layers=3, embedding_size=4, hidden_size=4), vocab_size=7)
    assert [layer.cell for layer in model.layers] == [slstm] * 3
    assert [len(s) for s in model.init_state(2)] == [4, 4, 4]


def test_cell_list_from_toml_and_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nlayers = 2\ncell = ["lstm", "gru"]\n')
    from_file = load_config(path)
    assert from_file.model.cell == "lstm,gru" and from_file.model.cells == ("lstm", "gru")
    assert load_config(None, ["model.cell=lstm, gru"]) == from_file
    assert load_config(None, ["model.cell=rnn", "model.layers=3"]).model.cells == ("rnn", "rnn", "rnn")
    assert load_config(tmp_path / "c.toml", ["model.cell=peephole"]).model.cells == ("peephole", "peephole")
    round_trip = tmp_path / "round.toml"
    round_trip.write_text(config_module.to_toml(from_file))
    assert load_config(round_trip) == from_file


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.cell=transformer"], "config key 'model.cell' must be one of lstm, peephole, coupled, gru, rnn, slstm, mogrifier, qrnn, dglstm, clockwork, got 'transformer'"),
        (["model.cell=lstm,tranformer"], "'model.cell' must be one of"),
        (["model.cell=lstm,,gru", "model.layers=3"], "'model.cell' must be one of"),
        (["model.cell=lstm,gru", "model.layers=3"], "config key 'model.cell' names 2 cells for 3 layers"),
        (["model.cell=lstm,gru,rnn"], "config key 'model.cell' names 3 cells for 2 layers"),
    ],
)
def test_bad_cell_names_and_counts_name_the_key(overrides, message):
    with pytest.raises(LmtrainError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_toml_cell_list_of_non_strings_is_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\ncell = [1, 2]\n")
    with pytest.raises(LmtrainError, match="'model.cell' must be str"):
        load_config(path)
