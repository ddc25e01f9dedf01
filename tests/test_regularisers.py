"""The regularisers of lmtrain.model.language_model and the engine: each does what its paper says, only in training."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model.cells import get_cell
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.recurrence import run_layer

VOCAB = 50


def model(**changes) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(**{"layers": 2, "embedding_size": 8, "hidden_size": 12, **changes})
    return LanguageModel(config, VOCAB).double()


def test_locked_dropout_shares_one_mask_over_time():
    m = model(dropout=0.5, locked_dropout=True).train()
    x = torch.ones(30, 4, 64, dtype=torch.float64)
    y = m.dropout(x, 0.5)
    assert torch.equal(y, y[:1].expand_as(y))  # the same mask at every step
    assert set(y.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert not torch.equal(y[:, 0], y[:, 1])  # but its own mask per stream
    unlocked = model(dropout=0.5).train().dropout(x, 0.5)
    assert not torch.equal(unlocked, unlocked[:1].expand_as(unlocked))


def test_embedding_dropout_drops_whole_words():
    m = model(embedding_dropout=0.5).train()
    tokens = torch.arange(10).repeat(20, 1)  # (20, 10): every word at every step
    x, plain = m.embed(tokens), m.embedding(tokens)
    dropped = (x == 0).all(-1)  # (T, B)
    assert dropped.any() and not dropped.all()
    assert torch.equal(dropped, dropped[:1].expand_as(dropped))  # a word is dropped everywhere or nowhere
    kept = ~dropped
    assert torch.allclose(x[kept], 2 * plain[kept])
    assert torch.equal(m.eval().embed(tokens), plain)


def test_weight_drop_masks_w_hh_and_its_gradient():
    cell = get_cell("lstm")
    torch.manual_seed(1)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    state = (torch.zeros(3, 6, dtype=torch.float64),) * 2
    w_ih = torch.randn(24, 4, dtype=torch.float64)
    w_hh = torch.randn(24, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64)
    torch.manual_seed(7)
    y, _ = run_layer(cell, x, state, w_ih, w_hh, b, weight_drop=0.5)
    y.sum().backward()
    torch.manual_seed(7)
    mask = torch.nn.functional.dropout(torch.ones_like(w_hh), 0.5, True)  # the same draw
    expected, _ = cell.reference(x, state, w_ih, (w_hh * mask).detach(), b)
    assert torch.allclose(y, expected, atol=1e-10)
    assert (w_hh.grad[mask == 0] == 0).all() and (w_hh.grad[mask != 0] != 0).any()


def test_weight_drop_only_in_training():
    m = model(weight_drop=0.9)
    tokens = torch.randint(0, VOCAB, (6, 2))
    m.eval()
    a, _ = m(tokens, m.init_state(2))
    b, _ = m(tokens, m.init_state(2))
    assert torch.equal(a, b)
    m.train()
    c, _ = m(tokens, m.init_state(2))
    assert not torch.allclose(a, c)


def test_tied_model_has_embedding_sized_last_layer():
    m = model(tie_weights=True, layers=3, embedding_size=8, hidden_size=20)
    assert [layer.hidden_size for layer in m.layers] == [20, 20, 8]
    assert m.decoder.weight is m.embedding.weight
    untied = model(layers=3, embedding_size=8, hidden_size=20)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in m.parameters()) > VOCAB * 8


def test_init_ranges_and_forget_bias():
    m = model(init_range=0.01, recurrent_init="torch", forget_bias=1.0)
    assert m.embedding.weight.abs().max() <= 0.01
    layer = m.layers[0]
    bound = 1 / math.sqrt(12)
    assert 0.01 < layer.w_hh.abs().max() <= bound
    forget = layer.b_ih[12:24]
    assert (forget > 1 - bound).all() and (forget < 1 + bound).all()
    assert layer.b_ih[:12].abs().max() <= bound
    with pytest.raises(LmtrainError, match="cell 'gru' has no forget gate"):
        model(cell="gru", forget_bias=1.0)


def test_dropout_places_fall_back_to_dropout():
    assert ModelConfig(dropout=0.3, dropout_hidden=0.1).dropouts() == (0.3, 0.1, 0.3)
    assert ModelConfig(dropout=0.0, dropout_input=0.2).dropouts() == (0.2, 0.0, 0.0)


def test_bf16_decoder_is_close_and_trains_float32_weights():
    m = model().float()
    h = torch.randn(4, 3, 12)  # the last layer's output (hidden_size 12)
    exact = m.decode(h)
    fast = m.decode(h, torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    assert torch.allclose(fast.float(), exact, atol=0.05)
    fast.float().square().sum().backward()
    assert m.decoder.weight.grad.dtype == torch.float32 and m.decoder.weight.grad.abs().sum() > 0
