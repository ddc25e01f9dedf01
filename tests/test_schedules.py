"""The training loop's pieces: lr schedules, variable-length BPTT, NT-ASGD's switch and average."""

from __future__ import annotations

import math

import numpy as np
import torch

from lmtrain.config import ModelConfig, TrainConfig
from lmtrain.model.language_model import LanguageModel
from lmtrain.training.averaging import WeightAverage, nt_trigger
from lmtrain.training.loop import window_lengths
from lmtrain.training.schedule import lr, plateau_lr, step_lr
from lmtrain.training.stops import out_of_time


def test_cosine_with_warmup():
    c = TrainConfig(optimizer="adamw", lr=1e-3, lr_schedule="cosine", warmup_steps=10)
    assert math.isclose(step_lr(c, c.lr, 0, 100), 1e-4)  # warm-up: (step + 1) / 10 of the cosine's value
    assert math.isclose(step_lr(c, c.lr, 9, 100), 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert math.isclose(step_lr(c, c.lr, 50, 100), 0.5e-3)
    assert step_lr(c, c.lr, 100, 100) == 0.0
    plain = TrainConfig(lr=20.0, lr_schedule="plateau")
    assert step_lr(plain, 5.0, 1234, 100) == 5.0


def test_a_step_rate_follows_its_window_under_variable_bptt():
    fixed = TrainConfig(lr=20.0, lr_schedule="plateau", bptt=70)
    assert lr(fixed, 5.0, 3, 100, 35) == 5.0  # fixed windows: the epoch's rate whatever the length
    variable = TrainConfig(lr=20.0, lr_schedule="plateau", bptt=70, variable_bptt=True)
    assert lr(variable, 5.0, 3, 100, 35) == 2.5 and lr(variable, 5.0, 3, 100, 70) == 5.0


def test_plateau_divides_only_when_validation_did_not_improve():
    plateau = TrainConfig(lr=20.0, lr_schedule="plateau", lr_decay=4.0)
    assert plateau_lr(plateau, 20.0, improved=True) == 20.0
    assert plateau_lr(plateau, 20.0, improved=False) == 5.0
    for other in ("epoch", "cosine", "constant"):
        assert plateau_lr(TrainConfig(lr=20.0, lr_schedule=other, lr_decay=4.0), 20.0, improved=False) == 20.0


def test_fixed_windows_cover_the_split():
    assert window_lengths(23, TrainConfig(bptt=5), np.random.default_rng(0)) == [5, 5, 5, 5, 3]


def test_variable_windows_follow_awd_lstm():
    c = TrainConfig(bptt=70, variable_bptt=True)
    lengths = window_lengths(200_000, c, np.random.default_rng(1))
    assert sum(lengths) == 200_000 and min(lengths) >= 5
    short = sum(1 for n in lengths if n < 52)  # from the bptt / 2 = 35 branch: N(35, 5)
    assert 0.03 < short / len(lengths) < 0.07  # p = 0.05
    long = [n for n in lengths if n >= 52]
    assert abs(np.mean(long) - 69.5) < 0.5 and abs(np.std(long) - 5) < 0.5  # int() truncates: mean 70 - 0.5
    assert window_lengths(1000, c, np.random.default_rng(1)) == window_lengths(1000, c, np.random.default_rng(1))


def test_nt_trigger():
    assert not nt_trigger([5.0, 4.0, 3.0], 1)
    assert not nt_trigger([5.0, 4.0, 4.5], 2)  # compared with the checks before the previous 2: none yet
    assert not nt_trigger([5.0, 4.0, 4.1, 4.2], 2)  # 4.2 is better than 5.0, the only one that old
    assert nt_trigger([3.0, 4.0, 4.1, 4.2], 2)  # worse than 3.0: switch


def test_weight_average_is_the_mean_of_the_iterates():
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(layers=1, embedding_size=4, hidden_size=4), 10)
    average = WeightAverage(m)
    seen = [m.decoder.weight.detach().clone()]
    for _ in range(4):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        seen.append(m.decoder.weight.detach().clone())
    trained = m.decoder.weight.detach().clone()
    with average.swapped_in():
        assert torch.allclose(m.decoder.weight, torch.stack(seen).mean(0), atol=1e-6)
    assert torch.equal(m.decoder.weight, trained)


def test_time_budget():
    c = TrainConfig(max_minutes=10)
    assert not out_of_time(c, 599.9) and out_of_time(c, 600)
    assert not out_of_time(TrainConfig(), 1e9)
