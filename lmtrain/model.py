"""The language model: embedding -> stacked recurrent layers (ours) -> decoder, with explicit state.

    tokens (T, B) ─ embedding ─▶ (T, B, E) ─ dropout ─▶ LSTM 1 ─ dropout ─▶ ... ─▶ LSTM L
                 ─ dropout ─▶ (T, B, H) ─ decoder (tied to the embedding or not) ─▶ logits (T, B, V)

The recurrent state is a list with one tuple per layer (the cell's state, h first: (h, c) for the
LSTM), each tensor (B, H). It is passed in and returned, never kept on the module.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.cells import get_cell
from lmtrain.config import ModelConfig
from lmtrain.recurrence import run_layer

State = list[tuple[Tensor, ...]]


class RecurrentLayer(nn.Module):
    """One layer's parameters; the recurrence itself is `lmtrain.recurrence.run_layer`.

    w_ih: (GH, I), w_hh: (GH, H), b_ih: (GH,), and b_hh: (GH,) only for cells that keep the
    recurrent bias apart (GRU); extra per-unit parameters as the cell declares (peepholes).
    G is the cell's gate count; gate order is the cell module's.
    """

    def __init__(self, cell: ModuleType, input_size: int, hidden_size: int):
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        width = cell.GATES * hidden_size
        self.w_ih = nn.Parameter(torch.empty(width, input_size))
        self.w_hh = nn.Parameter(torch.empty(width, hidden_size))
        self.b_ih = nn.Parameter(torch.empty(width))
        self.b_hh = nn.Parameter(torch.empty(width)) if cell.RECURRENT_BIAS else None
        self.extra = nn.ParameterList(nn.Parameter(torch.empty(blocks * hidden_size)) for blocks in cell.EXTRA.values())

    def init_state(self, batch_size: int, like: Tensor) -> tuple[Tensor, ...]:
        return tuple(like.new_zeros(batch_size, self.hidden_size) for _ in self.cell.STATE)

    def forward(self, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run_layer(self.cell, x, state, self.w_ih, self.w_hh, self.b_ih, self.b_hh, tuple(self.extra))


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        sizes = [config.embedding_size] + [config.hidden_size] * config.layers
        self.layers = nn.ModuleList(
            RecurrentLayer(get_cell(name), sizes[i], sizes[i + 1]) for i, name in enumerate(config.cells)
        )
        self.decoder = nn.Linear(config.hidden_size, vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        for p in self.parameters():
            nn.init.uniform_(p, -config.init_range, config.init_range)

    def init_state(self, batch_size: int) -> State:
        """Zero state for `batch_size` streams on the model's device and dtype."""
        return [layer.init_state(batch_size, self.decoder.weight) for layer in self.layers]

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens (T, B) int64 -> logits (T, B, V) and the new state."""
        p = self.config.dropout
        x = F.dropout(self.embedding(tokens), p, self.training)
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            x, layer_state = layer(x, layer_state)
            x = F.dropout(x, p, self.training)
            new_state.append(layer_state)
        return self.decoder(x), new_state


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while keeping the values."""
    return [tuple(s.detach() for s in layer_state) for layer_state in state]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, a tied matrix counted once."""
    return sum(p.numel() for p in model.parameters())
