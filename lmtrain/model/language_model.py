"""The language model: embedding -> stacked recurrent layers (ours) -> decoder, with explicit state.

    tokens (T, B) ─ embedding (word dropout) ─▶ (T, B, E) ─ dropout_input ─▶ layer 1 ─ dropout_hidden ─▶
    ... ─▶ layer L ─ dropout_output ─▶ (T, B, H_L) ─ decoder (tied to the embedding or not) ─▶ logits (T, B, V)

Every regulariser is a config key (lmtrain.config.ModelConfig) and is active only in training mode:
dropout with a fresh or a locked (per window and stream) mask, embedding dropout (whole words),
and weight drop on W_hh, which the recurrence engine applies (lmtrain.model.recurrence.run_layer).

The recurrent state is a list with one tuple per layer (the cell's state, h first: (h, c) for the
LSTM), each tensor (B, H_l). It is passed in and returned, never kept on the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmtrain.config import ModelConfig
from lmtrain.model.layer import layer_class, stack, stack_forward

State = list[tuple[Tensor, ...]]


class LanguageModel(nn.Module):
    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embedding_size)
        self.layers = nn.ModuleList(
            layer_class(cell)(cell, inputs, units, config, below) for cell, inputs, units, below in stack(config)
        )
        self.decoder = nn.Linear(config.layer_sizes[-1], vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform init in ±model.init_range, then each layer's own (lmtrain.model.layer.RecurrentLayer.initialise)."""
        for p in self.parameters():
            nn.init.uniform_(p, -self.config.init_range, self.config.init_range)
        for layer in self.layers:
            layer.initialise(self.config)

    def init_state(self, batch_size: int) -> State:
        """Zero state for `batch_size` streams on the model's device and dtype."""
        return [layer.init_state(batch_size, self.decoder.weight) for layer in self.layers]

    def forward(self, tokens: Tensor, state: State, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, State]:
        """tokens (T, B) int64 -> logits (T, B, V) and the new state.

        compute_dtype: None, or torch.bfloat16 for mixed precision (train.precision = bf16): every
        product takes bfloat16 operands, the weights staying float32 (see `hidden` and `decode`)."""
        _, dropped, state = self.hidden(tokens, state, compute_dtype)
        return self.decode(dropped, compute_dtype), state

    def hidden(self, tokens: Tensor, state: State, compute_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, State]:
        """tokens (T, B) -> the last layer's output (T, B, H_L) before and after its dropout, new state.

        compute_dtype torch.bfloat16: the layers' GEMMs take bfloat16 operands and keep float32
        sums; their state, outputs and pointwise work stay float32 (lmtrain.model.kernels.mixed)."""
        p_input, p_hidden, p_output = self.config.dropouts()
        x = self.dropout(self.embed(tokens), p_input)
        new_state = []
        up = None  # what the layer below hands up beside its output (lmtrain.model.layer; dglstm: its cells)
        for k, (layer, layer_state) in enumerate(zip(self.layers, state)):
            x, layer_state, up = stack_forward(layer, x, layer_state, up, self.config.weight_drop, compute_dtype)
            new_state.append(layer_state)
            if k < len(self.layers) - 1:
                x = self.dropout(x, p_hidden)
        return x, self.dropout(x, p_output), new_state

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens (T, B) -> (T, B, E); in training, each word of the vocabulary is dropped with
        p = embedding_dropout (all its occurrences in the window) and the rest scaled by 1 / (1 - p)."""
        p = self.config.embedding_dropout
        x = self.embedding(tokens)
        if not (self.training and p):
            return x
        keep = torch.empty(self.vocab_size, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - p) / (1 - p)
        return x * F.embedding(tokens, keep)

    def dropout(self, x: Tensor, p: float) -> Tensor:
        """x (T, B, D); with locked_dropout one mask (1, B, D) serves every step of the window."""
        if not (self.training and p):
            return x
        if not self.config.locked_dropout:
            return F.dropout(x, p, True)
        mask = x.new_empty(1, x.size(1), x.size(2)).bernoulli_(1 - p) / (1 - p)
        return x * mask

    def decode(self, h: Tensor, compute_dtype: torch.dtype | None = None) -> Tensor:
        """h (T, B, H_L) -> logits (T, B, V); with `compute_dtype` (bfloat16) the product takes operands and
        gives logits in that type (accumulating in float32; gradients reach the float32 weights
        through the casts), for lmtrain.model.kernels.cross_entropy to take as they are."""
        w, b = self.decoder.weight, self.decoder.bias
        if compute_dtype is None or compute_dtype == w.dtype:
            return F.linear(h, w, b)
        return F.linear(h.to(compute_dtype), w.to(compute_dtype), b.to(compute_dtype))


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while keeping the values."""
    return [tuple(s.detach() for s in layer_state) for layer_state in state]


def count_parameters(model: nn.Module) -> int:
    """Parameters, a tied matrix counted once; a reservoir's fixed ones (model.reservoir) included."""
    return sum(p.numel() for p in model.parameters())
