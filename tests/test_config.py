"""Config resolution: defaults < TOML file < --set, and errors that name the key."""

import tomllib
from pathlib import Path

import pytest

from lmtrain.config import Config, TrainConfig, from_dict, load_config, to_dict, to_toml
from lmtrain.errors import LmtrainError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_file_overrides(tmp_path):
    path = write(tmp_path, "[train]\nlr = 0.5\nbptt = 20\n[model]\ntie_weights = true\nembedding_size = 64\nhidden_size = 64\n")
    config = load_config(path, ["train.lr=0.25", "train.optimizer=adamw", "model.dropout=0.3"])
    assert config.train.lr == 0.25  # --set beats the file
    assert config.train.bptt == 20  # the file beats the default
    assert config.train.batch_size == TrainConfig.batch_size  # the default stands
    assert config.train.optimizer == "adamw" and config.model.dropout == 0.3 and config.model.tie_weights


def test_int_given_for_float_is_accepted_and_converted():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    assert isinstance(load_config(None, ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.nope=1", "unknown config key 'train.nope'"),
        ("nosection.lr=1", "unknown config section 'nosection'"),
        ("train.batch_size=abc", "'train.batch_size' must be int"),
        ("train.batch_size=2.5", "'train.batch_size' must be int"),
        ("model.tie_weights=1", "'model.tie_weights' must be bool"),
        ("model.cell=transformer", "'model.cell' must be one of"),
        ("train.bptt=0", "'train.bptt' must be positive"),
        ("model.dropout=1.0", "'model.dropout' must be in [0, 1)"),
        ("model.weight_drop=1", "'model.weight_drop' must be in [0, 1)"),
        ("model.dropout_hidden=1.5", "'model.dropout_hidden' must be below 1"),
        ("train.precision=fp8", "'train.precision' must be one of auto, fp32, bf16"),
        ("train.optimizer=ntasgd", "ntasgd averages at a fixed rate"),
        ("train.nonmono=0", "'train.nonmono' must be positive"),
        ("train.ar=-1", "'train.ar' must not be negative"),
        ("trainlr", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(LmtrainError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(LmtrainError, match="unknown config key 'model.width'"):
        load_config(write(tmp_path, "[model]\nwidth = 3\n"))
    with pytest.raises(LmtrainError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\n"))
    with pytest.raises(LmtrainError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(LmtrainError, match="must be str"):
        load_config(write(tmp_path, "[train]\noptimizer = 3\n"))


def test_config_is_frozen():
    config = Config()
    with pytest.raises(AttributeError):
        config.train.lr = 3.0


def test_toml_and_dict_round_trips(tmp_path):
    config = load_config(None, ["train.optimizer=adamw", "model.layers=3", "tokenizer.kind=word"])
    assert load_config(write(tmp_path, to_toml(config))) == config
    assert from_dict(to_dict(config)) == config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_ptb_small_is_zaremba_small():
    c = load_config(CONFIGS / "ptb-small.toml")
    assert (c.model.layers, c.model.hidden_size, c.model.embedding_size, c.model.dropout) == (2, 200, 200, 0.0)
    assert (c.train.bptt, c.train.batch_size, c.train.lr, c.train.clip, c.train.epochs) == (20, 20, 1.0, 5.0, 13)
    assert (c.train.lr_schedule, c.train.lr_decay, c.train.lr_decay_start, c.model.init_range) == ("epoch", 2.0, 4, 0.1)
    assert c.train.loss_reduction == "sequence_sum"
    assert (c.tokenizer.kind, c.tokenizer.vocab_size) == ("word", 10_000)
    with open(CONFIGS / "ptb-small.toml", "rb") as f:
        assert set(tomllib.load(f)) <= {"tokenizer", "model", "train"}
