"""The language model: embedding -> stacked LSTM layers (ours) -> decoder, with explicit state.

    tokens (T, B) ─ embedding ─▶ (T, B, E) ─ dropout ─▶ LSTM 1 ─ dropout ─▶ ... ─▶ LSTM L
                 ─ dropout ─▶ (T, B, H) ─ decoder (tied to the embedding or not) ─▶ logits (T, B, V)

The recurrent state is a list with one (h, c) pair per layer, each (B, H). It is passed in and
returned, never kept on the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.cells import lstm
from lmtrain.config import ModelConfig
from lmtrain.recurrence import lstm_layer

State = list[tuple[Tensor, Tensor]]


class LSTMLayer(nn.Module):
    """One layer's parameters; the recurrence itself is `lmtrain.recurrence.lstm_layer`.

    w_ih: (4H, I), w_hh: (4H, H), bias: (4H,), gate order i, f, g, o. One bias per gate, where
    torch.nn.LSTM has two (b_ih + b_hh add up to ours).
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.w_ih = nn.Parameter(torch.empty(lstm.GATES * hidden_size, input_size))
        self.w_hh = nn.Parameter(torch.empty(lstm.GATES * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(lstm.GATES * hidden_size))

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return lstm_layer(x, state, self.w_ih, self.w_hh, self.bias)


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        sizes = [config.embedding_size] + [config.hidden_size] * config.layers
        self.layers = nn.ModuleList(LSTMLayer(sizes[i], sizes[i + 1]) for i in range(config.layers))
        self.decoder = nn.Linear(config.hidden_size, vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        for p in self.parameters():
            nn.init.uniform_(p, -config.init_range, config.init_range)

    def init_state(self, batch_size: int) -> State:
        """Zero state for `batch_size` streams on the model's device and dtype."""
        w = self.decoder.weight
        return [(w.new_zeros(batch_size, layer.hidden_size), w.new_zeros(batch_size, layer.hidden_size)) for layer in self.layers]

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
    return [(h.detach(), c.detach()) for h, c in state]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, a tied matrix counted once."""
    return sum(p.numel() for p in model.parameters())
