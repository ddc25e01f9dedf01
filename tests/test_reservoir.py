"""The echo-state reservoir (model.reservoir, Jaeger 2001): rnn layers whose W_ih, W_hh and bias stay
as drawn, W_hh at spectral radius model.spectral_radius; only the embedding and decoder train. Its
spectral radius, training that leaves the reservoir as drawn, checkpoints and resume that keep it,
its config errors and a CLI train/evaluate/generate run."""

from __future__ import annotations


import pytest
import torch
from helpers import TINY_WORD, assert_config_refused, cli, evaluate_and_generate, ok, resume_matches_straight, sets, write_small_corpus

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel, load_run
from lmtrain.model.layer import spectral_radius
from lmtrain.runtime import seed_everything

RESERVOIR = [*TINY_WORD, "model.layers=2", "model.cell=rnn", "model.reservoir=true", "train.log_interval=3"]


def reservoir_model(radius=0.9, **keys) -> LanguageModel:
    config = ModelConfig(cell="rnn", layers=2, embedding_size=6, hidden_size=9, reservoir=True, spectral_radius=radius, **keys)
    return LanguageModel(config, 13)


@pytest.mark.parametrize("radius, init", [(0.9, "range"), (1.3, "range"), (0.5, "torch")])
def test_every_w_hh_has_the_spectral_radius_asked_for(radius, init):
    torch.manual_seed(0)
    model = reservoir_model(radius, recurrent_init=init)
    for layer in model.layers:
        assert abs(float(spectral_radius(layer.w_hh)) - radius) < 1e-4
    plain = LanguageModel(ModelConfig(cell="rnn", layers=2, embedding_size=6, hidden_size=9), 13)
    assert all(abs(float(spectral_radius(layer.w_hh)) - radius) > 1e-2 for layer in plain.layers)


def test_only_the_embedding_and_decoder_are_trained():
    model = reservoir_model()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"embedding.weight", "decoder.weight", "decoder.bias"}
    assert {"layers.0.w_ih", "layers.0.w_hh", "layers.0.b_ih", "layers.1.w_hh"} <= set(model.state_dict())
    tokens = torch.randint(0, 13, (5, 3))
    logits, _ = model(tokens, model.init_state(3))
    logits.sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_a_state_dict_round_trip_is_the_same_model():
    """The fixed weights travel in the state_dict: a model drawn from another seed, loaded with it,
    gives the same loss."""
    torch.manual_seed(1)
    model = reservoir_model().eval()
    torch.manual_seed(2)
    other = reservoir_model().eval()
    tokens = torch.randint(0, 13, (7, 2))

    def loss(m):
        logits, _ = m(tokens[:-1], m.init_state(2))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())

    assert loss(model) != loss(other)
    other.load_state_dict(model.state_dict())
    assert loss(other) == loss(model)
    assert not any(p.requires_grad for layer in other.layers for p in layer.parameters())


def test_training_leaves_the_reservoir_as_drawn_and_moves_the_decoder(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*RESERVOIR, "train.max_steps=6")))
    loaded = load_run(run, torch.device("cpu"))
    seed_everything(loaded.config.train.seed)  # the model training started from (lmtrain.training.setup.start_run)
    start = LanguageModel(loaded.config.model, loaded.model.vocab_size).state_dict()
    trained = loaded.model.state_dict()
    for key in start:
        if key.startswith("layers."):
            assert torch.equal(trained[key], start[key]), key
        else:
            assert not torch.equal(trained[key], start[key]), key
    assert abs(float(spectral_radius(loaded.model.layers[1].w_hh)) - 0.9) < 1e-4


def test_resume_continues_exactly(tmp_path):
    resume_matches_straight(tmp_path, [*RESERVOIR, "train.optimizer=adamw", "train.lr=0.003"])


@pytest.mark.parametrize("setting, fragment", [
    ("model.cell=lstm", "config key 'model.reservoir' is for model.cell = rnn only (a fixed random recurrence), got 'lstm'"),
    ("model.cell=rnn,gru", "config key 'model.reservoir' is for model.cell = rnn only (a fixed random recurrence), got 'rnn,gru'"),
    ("model.spectral_radius=0", "config key 'model.spectral_radius' must be positive, got 0.0"),
    ("model.spectral_radius=-0.5", "config key 'model.spectral_radius' must be positive, got -0.5"),
    ("model.spectral_radius=true", "config key 'model.spectral_radius' must be float, got True"),
])
def test_bad_values_are_one_error_line_naming_the_key(setting, fragment, tmp_path):
    items = ["model.cell=rnn", "model.layers=2", "model.reservoir=true", setting]
    assert_config_refused(tmp_path, items, fragment, "model.(reservoir|spectral_radius)")


def test_an_initial_w_hh_of_zeros_is_an_error_not_nans():
    with pytest.raises(LmtrainError, match="model.reservoir: the initial W_hh has spectral radius 0"):
        reservoir_model(init_range=0.0)


def test_train_evaluate_and_generate_through_the_cli(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    result = ok(cli("train", corpus, "--run-dir", run, *sets(*RESERVOIR, "model.spectral_radius=0.95", "train.max_steps=6")))
    assert "trained)" in result.stderr
    evaluate_and_generate(run)
