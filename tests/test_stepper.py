"""The generation stepper (lmtrain/generation/stepper.py) against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.generation.stepper import Stepper, available_precisions
from lmtrain.model.cells import CELLS
from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.language_model import LanguageModel

# worst error of the logits relative to their largest magnitude, per precision
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "int8": 5e-2}


def need(precision: str) -> None:
    """Skip the test where this machine's compiled products do not offer `precision`."""
    if precision not in available_precisions(torch.device("cpu")):
        pytest.skip(f"{precision} products need CPU features this machine lacks")


def need_whole_step() -> None:
    """Skip the test without the compiled ops: the whole-step op is one of them."""
    if cpu_ops() is None:
        pytest.skip("the whole-step op needs the compiled ops (LMTRAIN_COMPILE=0, or no compiler)")


def run_both(model: LanguageModel, precision: str, steps: int = 6, batch: int = 3):
    """The model's sequence forward and the stepper over the same tokens -> (reference, stepped) logits (T, B, V)."""
    tokens = torch.randint(0, model.vocab_size, (steps, batch), generator=torch.Generator().manual_seed(0))
    state = model.init_state(batch)
    with torch.no_grad():
        reference, _ = model(tokens, state)
    stepper = Stepper(model, precision)
    stepped = []
    for token in tokens:
        logits, state = stepper.step(token, state)
        stepped.append(logits)
    return reference, torch.stack(stepped)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_stepper_matches_the_forward_pass(cell, precision):
    need(precision)
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, layers=2, embedding_size=24, hidden_size=40, init_range=0.3)
    model = LanguageModel(config, 50).eval()
    reference, stepped = run_both(model, precision)
    error = ((stepped - reference).abs().max() / reference.abs().max()).item()
    assert error < TOLERANCE[precision], (cell, precision, error)


def test_stepper_without_the_embedding_table(monkeypatch):
    monkeypatch.setattr("lmtrain.generation.stepper.TABLE_BUDGET_BYTES", 0)  # layer 0 multiplies the embedding row instead
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=16, tie_weights=True), 30).eval()
    assert Stepper(model).table is None
    assert Stepper(model).stack is None  # the whole-step op needs the table
    reference, stepped = run_both(model, "fp32")
    assert torch.allclose(stepped, reference, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_a_stream_does_not_depend_on_the_streams_beside_it(precision):
    need(precision)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=32, hidden_size=48), 70).eval()
    stepper = Stepper(model, precision)
    tokens = torch.tensor([5, 9, 1, 33, 2, 69, 0, 12, 40, 3, 8, 7, 6, 11])  # 14 streams: two blocks of rows
    state = [tuple(torch.randn(14, 48) for _ in layer) for layer in model.init_state(14)]
    together, _ = stepper.step(tokens, state)
    for b in range(14):
        alone, _ = stepper.step(tokens[b : b + 1], [tuple(s[b : b + 1] for s in layer) for layer in state])
        assert torch.equal(alone, together[b : b + 1])


def random_state(layers: int, batch: int, hidden: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(batch, hidden, generator=g) for _ in range(2)) for _ in range(layers)]


def random_states(model: LanguageModel, batch: int, seed: int):
    """A state of the model's layout with every value positive and away from 0 (an sLSTM's
    normaliser divides), so that any difference shows."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(s.shape, generator=g).abs() + 0.1 for s in layer) for layer in model.init_state(batch)]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("lstm", 3), ("gru", 2), ("slstm", 2), ("peephole", 1),
                                         ("coupled", 2), ("rnn", 2), ("gru,lstm,slstm", 3), ("lstm,gru", 2)])
def test_the_whole_step_op_is_the_op_by_op_step_bit_for_bit(precision, cell, layers):
    """Every cell, alone or mixed: layer 0 from the table, joint products above, and the GRU's two
    products apart above layer 0 (its recurrent bias)."""
    need(precision)
    need_whole_step()
    torch.manual_seed(0)
    # odd sizes: partial panels, a K that is not a multiple of 4, and 1 or 2 blocks of rows
    model = LanguageModel(ModelConfig(cell=cell, layers=layers, embedding_size=40, hidden_size=37), 101).eval()
    for layer in model.layers:  # per-unit parameters that matter (the peepholes)
        for e in layer.extra:
            torch.nn.init.uniform_(e, -0.5, 0.5)
    stepper = Stepper(model, precision)
    assert stepper.stack is not None
    for batch in (1, 13):
        state = random_states(model, batch, seed=batch)
        tokens = torch.randint(0, 101, (batch,), generator=torch.Generator().manual_seed(batch))
        whole, whole_state = stepper.step(tokens, state)
        stepper.unfused = True
        parts, parts_state = stepper.step(tokens, state)
        stepper.unfused = False
        assert torch.isfinite(whole).all() and torch.equal(whole, parts)
        for a, b in zip(whole_state, parts_state):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        assert not torch.equal(whole_state[0][0], state[0][0])  # the state moved on
    if precision == "fp32":  # and the whole step follows the model itself
        reference, stepped = run_both(model, precision)
        assert torch.allclose(stepped, reference, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_whole_step_op_draws_what_pick_draws(precision):
    need(precision)
    need_whole_step()
    from lmtrain.generation.sampler import pick

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=24, hidden_size=40), 300).eval()
    stepper = Stepper(model, precision)
    g = torch.Generator().manual_seed(1)
    logits, uniforms, state = torch.randn(14, 300, generator=g) * 3, torch.rand(14, generator=g), random_state(2, 14, 40, 2)
    tokens, next_logits, next_state = stepper.draw(logits, uniforms, 0.8, state)
    expected = pick(logits, 0.8, 0, 1.0, uniforms)
    assert torch.equal(tokens, expected) and len(set(tokens.tolist())) > 5
    stepped, stepped_state = stepper.step(expected, state)
    assert torch.equal(next_logits, stepped)
    assert all(torch.equal(a, b) for x, y in zip(next_state, stepped_state) for a, b in zip(x, y))


def test_the_whole_step_op_refuses_a_token_outside_the_vocabulary():
    model = LanguageModel(ModelConfig(layers=1, embedding_size=8, hidden_size=8), 20).eval()
    stepper = Stepper(model)
    if stepper.stack is None:
        pytest.skip("the compiled kernels are not built on this machine")
    with pytest.raises(RuntimeError, match="outside the table"):
        stepper.step(torch.tensor([3, 20]), model.init_state(2))


def test_the_whole_step_op_writes_the_buffers_it_is_given_and_never_its_inputs():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=24, hidden_size=40), 300).eval()
    stepper = Stepper(model, available_precisions(torch.device("cpu"))[-1])
    if stepper.stack is None:
        pytest.skip("the compiled kernels are not built on this machine")
    g = torch.Generator().manual_seed(1)
    logits, uniforms, state = torch.randn(5, 300, generator=g), torch.rand(5, generator=g), random_state(2, 5, 40, 2)
    out = stepper.new_outputs(5)
    tokens, into, into_state = stepper.draw(logits, uniforms, 1.0, state, out)
    fresh_tokens, fresh, fresh_state = stepper.draw(logits, uniforms, 1.0, state)
    assert into is out[0] and into_state[1][1] is out[4]
    assert torch.equal(tokens, fresh_tokens) and torch.equal(into, fresh) and torch.equal(into_state[1][1], fresh_state[1][1])
    with pytest.raises(RuntimeError, match="an output is also an input"):
        stepper.draw(into, uniforms, 1.0, into_state, out)


def test_sampling_through_the_whole_step_op_draws_what_the_op_by_op_steps_draw(monkeypatch):
    from lmtrain.generation.sampler import SampleSettings, sample

    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=24), 40).eval()
    for precision in available_precisions(torch.device("cpu")):
        whole = torch.stack(list(sample(model, [3, 4], SampleSettings(50, 3, 0.9, seed=7, precision=precision))))
        monkeypatch.setattr(Stepper, "unfused", True)
        parts = torch.stack(list(sample(model, [3, 4], SampleSettings(50, 3, 0.9, seed=7, precision=precision))))
        monkeypatch.setattr(Stepper, "unfused", False)
        assert torch.equal(whole, parts), precision
        assert len(set(whole.flatten().tolist())) > 10
