"""A cell's own layer (lmtrain.model.layer: `Layer` in its module) is what the model builds, what
checkpoints are checked against, and what generation steps through its forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.generation.stepper import Stepper
from lmtrain.model import LanguageModel, RecurrentLayer, get_cell, is_standard, layer_class, model_shapes, onnx_bytes
from lmtrain.training.preflight import parameter_count


class ScaledLayer(RecurrentLayer):
    """The standard layer with one more parameter of another shape: a per-input scale on x."""

    def __init__(self, cell, input_size, hidden_size, config=None, below=None):
        super().__init__(cell, input_size, hidden_size, config, below)
        self.scale = nn.Parameter(torch.empty(input_size))

    @staticmethod
    def shapes(cell, input_size, hidden_size, config=None, below=None):
        return RecurrentLayer.shapes(cell, input_size, hidden_size, config, below) | {"scale": (input_size,)}

    def initialise(self, config):
        super().initialise(config)
        with torch.no_grad():
            self.scale.uniform_(0.5, 1.5)

    def forward(self, x, state, weight_drop=0.0, compute_dtype=None):
        return super().forward(x * self.scale, state, weight_drop, compute_dtype)


@pytest.fixture
def own_rnn(monkeypatch):
    monkeypatch.setattr(get_cell("rnn"), "Layer", ScaledLayer, raising=False)
    return ModelConfig(cell="rnn", layers=2, embedding_size=12, hidden_size=16)


def test_the_model_builds_the_cells_own_layer_and_its_shapes_are_the_real_ones(own_rnn):
    assert layer_class(get_cell("rnn")) is ScaledLayer and layer_class(get_cell("lstm")) is RecurrentLayer
    torch.manual_seed(0)
    model = LanguageModel(own_rnn, 30)
    assert all(isinstance(layer, ScaledLayer) and not is_standard(layer) for layer in model.layers)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == model_shapes(own_rnn, 30)
    assert list(model.state_dict()) == list(model_shapes(own_rnn, 30))
    assert parameter_count(own_rnn, 30) == sum(p.numel() for p in model.parameters())
    assert all(0.5 <= float(s.min()) and float(s.max()) <= 1.5 for s in (layer.scale for layer in model.layers))


def test_generation_steps_an_own_layer_through_its_forward(own_rnn):
    torch.manual_seed(0)
    model = LanguageModel(own_rnn, 30).eval()
    tokens = torch.randint(0, 30, (7, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = model(tokens, model.init_state(3))
    stepper = Stepper(model)
    assert stepper.stack is None
    state, stepped = model.init_state(3), []
    for token in tokens:
        logits, state = stepper.step(token, state)
        stepped.append(logits)
    assert torch.allclose(torch.stack(stepped), expected, atol=1e-5)


def test_onnx_export_refuses_an_own_layer_by_name(own_rnn):
    pytest.importorskip("onnx")
    with pytest.raises(LmtrainError, match="does not cover the rnn cell"):
        onnx_bytes(LanguageModel(own_rnn, 30))
