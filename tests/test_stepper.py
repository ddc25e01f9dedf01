"""The generation stepper (lmtrain/stepper.py) against the model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from lmtrain.cells import CELLS
from lmtrain.config import ModelConfig
from lmtrain.model import LanguageModel
from lmtrain.stepper import Stepper, available_precisions

# worst error of the logits relative to their largest magnitude, per precision
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "int8": 5e-2}


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
    if precision not in available_precisions(torch.device("cpu")):
        pytest.skip(f"{precision} products need CPU features this machine lacks")
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, layers=2, embedding_size=24, hidden_size=40, init_range=0.3)
    model = LanguageModel(config, 50).eval()
    reference, stepped = run_both(model, precision)
    error = ((stepped - reference).abs().max() / reference.abs().max()).item()
    assert error < TOLERANCE[precision], (cell, precision, error)


def test_stepper_without_the_embedding_table(monkeypatch):
    monkeypatch.setattr("lmtrain.stepper.TABLE_BUDGET_BYTES", 0)  # layer 0 multiplies the embedding row instead
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=16, tie_weights=True), 30).eval()
    assert Stepper(model).table is None
    reference, stepped = run_both(model, "fp32")
    assert torch.allclose(stepped, reference, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_a_stream_does_not_depend_on_the_streams_beside_it(precision):
    if precision not in available_precisions(torch.device("cpu")):
        pytest.skip(f"{precision} products need CPU features this machine lacks")
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=32, hidden_size=48), 70).eval()
    stepper = Stepper(model, precision)
    tokens = torch.tensor([5, 9, 1, 33, 2, 69, 0, 12, 40, 3, 8, 7, 6, 11])  # 14 streams: two blocks of rows
    state = [tuple(torch.randn(14, 48) for _ in layer) for layer in model.init_state(14)]
    together, _ = stepper.step(tokens, state)
    for b in range(14):
        alone, _ = stepper.step(tokens[b : b + 1], [tuple(s[b : b + 1] for s in layer) for layer in state])
        assert torch.equal(alone, together[b : b + 1])
