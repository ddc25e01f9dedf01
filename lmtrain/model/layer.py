"""One recurrent layer: its parameters, its zero state and its run over a window.

The standard layer (RecurrentLayer) holds what the recurrence engine (lmtrain.model.recurrence)
takes: W_ih, W_hh, b_ih, b_hh where the cell keeps it, and the cell's per-unit parameters. A cell
whose layer needs more (parameters of other shapes, options of its own, a state of another width)
defines `Layer` in its module, a subclass of RecurrentLayer with the same interface:

    Layer(cell, input_size, hidden_size, config)      config: lmtrain.config.ModelConfig (or None)
    Layer.shapes(cell, input_size, hidden_size, config) -> {name: shape}, its state_dict, in order
    Layer.state_widths(cell, input_size, hidden_size, config) -> each state tensor's width (B, width)
    layer.initialise(config)                           after the model's uniform init
    layer.init_state(batch_size, like) -> the state tuple (h first)
    layer(x (T, B, I), state, weight_drop, compute_dtype) -> y (T, B, H), the new state

A layer that is not a RecurrentLayer exactly is "its own" for generation (lmtrain.generation.stepper
runs it a step at a time through its forward) and for export (which refuses what it cannot write).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor, nn

from lmtrain.errors import LmtrainError
from lmtrain.model.recurrence import run_layer


class RecurrentLayer(nn.Module):
    """One layer's parameters; the recurrence itself is `lmtrain.model.recurrence.run_layer`.

    w_ih: (GH, I), w_hh: (GH, H), b_ih: (GH,), and b_hh: (GH,) only for cells that keep the
    recurrent bias apart (GRU); extra per-unit parameters as the cell declares (peepholes).
    G is the cell's gate count; gate order is the cell module's.
    """

    def __init__(self, cell: ModuleType, input_size: int, hidden_size: int, config=None):
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        for name, shape in self.shapes(cell, input_size, hidden_size, config).items():
            if not name.startswith("extra."):
                setattr(self, name, nn.Parameter(torch.empty(shape)))
        if not cell.RECURRENT_BIAS:
            self.b_hh = None
        self.extra = nn.ParameterList(nn.Parameter(torch.empty(blocks * hidden_size)) for blocks in cell.EXTRA.values())

    @staticmethod
    def shapes(cell: ModuleType, input_size: int, hidden_size: int, config=None) -> dict[str, tuple[int, ...]]:
        """The layer's state_dict shapes, by name, in its order."""
        width = cell.GATES * hidden_size
        shapes = {"w_ih": (width, input_size), "w_hh": (width, hidden_size), "b_ih": (width,)}
        if cell.RECURRENT_BIAS:
            shapes["b_hh"] = (width,)
        return shapes | {f"extra.{j}": (blocks * hidden_size,) for j, blocks in enumerate(cell.EXTRA.values())}

    @staticmethod
    def state_widths(cell: ModuleType, input_size: int, hidden_size: int, config=None) -> tuple[int, ...]:
        """The width of each tensor of the state tuple, (B, width), in the cell's STATE order: H each."""
        return (hidden_size,) * len(cell.STATE)

    def initialise(self, config) -> None:
        """After the model's uniform init: model.recurrent_init = torch, then model.forget_bias."""
        if config.recurrent_init == "torch":
            bound = 1 / math.sqrt(self.hidden_size)
            for p in self.parameters():
                nn.init.uniform_(p, -bound, bound)
        if config.forget_bias:
            gate = getattr(self.cell, "FORGET_GATE", None)
            if gate is None:
                raise LmtrainError(f"model.forget_bias: cell '{self.cell.__name__.rsplit('.', 1)[-1]}' has no forget gate")
            with torch.no_grad():
                self.b_ih[gate * self.hidden_size : (gate + 1) * self.hidden_size] += config.forget_bias

    def init_state(self, batch_size: int, like: Tensor) -> tuple[Tensor, ...]:
        return tuple(like.new_zeros(batch_size, self.hidden_size) for _ in self.cell.STATE)

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weight_drop: float = 0.0,
                compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run_layer(self.cell, x, state, self.w_ih, self.w_hh, self.b_ih, self.b_hh, tuple(self.extra),
                         weight_drop=weight_drop if self.training else 0.0, compute_dtype=compute_dtype)


def layer_class(cell: ModuleType) -> type[RecurrentLayer]:
    """The layer a cell runs in: its module's `Layer`, or the standard one."""
    return getattr(cell, "Layer", RecurrentLayer)


def is_standard(layer: nn.Module) -> bool:
    """Whether `layer` is the standard layer, whose weights generation and export read directly."""
    return type(layer) is RecurrentLayer
