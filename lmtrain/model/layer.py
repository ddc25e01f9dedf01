"""One recurrent layer: its parameters, its zero state and its run over a window.

The standard layer (RecurrentLayer) holds what the recurrence engine (lmtrain.model.recurrence)
takes: W_ih, W_hh, b_ih, b_hh where the cell keeps it, and the cell's per-unit parameters. A cell
whose layer needs more (parameters of other shapes, options of its own, a state of another width)
defines `Layer` in its module, a subclass of RecurrentLayer with the same interface:

    Layer(cell, input_size, hidden_size, config, below)       config: lmtrain.config.ModelConfig (or None)
    Layer.shapes(cell, input_size, hidden_size, config, below) -> {name: shape}, its state_dict, in order
    Layer.state_widths(cell, input_size, hidden_size, config)  -> {name: width}, its state, in order:
                                                                  each tensor (B, width), h first
    layer.initialise(config)                                   after the model's uniform init
    layer.init_state(batch_size, like) -> the state tuple (h first)
    layer(x (T, B, I), state, weight_drop, compute_dtype) -> y (T, B, H), the new state

below: the cell module of the layer underneath, None for the first layer (`stack` gives each
layer's); the standard layer ignores it, a cell may build a different layer on top of its own
kind (dglstm: its depth gate exists only above a dglstm layer).

A layer may also hand a sequence up the stack, beside its output, to the layer above (dglstm:
its cells c_1 .. c_T, (T, B, H), which the depth gate of the dglstm layer above reads; dropout
between layers applies to y only). Such a layer sets `passes_up = True`, and its forward takes
what the layer below handed up and returns what it hands up:

    layer(x, state, weight_drop, compute_dtype, below=up_of_the_layer_below) -> y, the new state, up

`below` is None for the first layer and above a layer that hands nothing up. The stack calls
every layer through `stack_forward`, which gives each kind its arguments and returns (y, state,
up) for both, up None from a standard layer: the model's window (lmtrain.model.language_model)
and generation's steps (lmtrain.generation.stepper, a window of one token) alike, so the side
sequence passes up in generation too.

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

    passes_up = False  # forward takes `below` and returns a third value, for the layer above (module docstring)

    def __init__(self, cell: ModuleType, input_size: int, hidden_size: int, config=None, below: ModuleType | None = None):
        super().__init__()
        self.cell = cell
        self.hidden_size = hidden_size
        for name, shape in self.shapes(cell, input_size, hidden_size, config, below).items():
            if not name.startswith("extra."):
                setattr(self, name, nn.Parameter(torch.empty(shape)))
        if not cell.RECURRENT_BIAS:
            self.b_hh = None
        self.extra = nn.ParameterList(nn.Parameter(torch.empty(blocks * hidden_size)) for blocks in cell.EXTRA.values())
        if config is not None and config.reservoir:
            # fixed, yet parameters: in the state_dict (checkpoints hold the reservoir that was drawn),
            # in the optimizer's list (which skips them: they never get a gradient), in the counts
            for p in self.parameters():
                p.requires_grad_(False)

    @staticmethod
    def shapes(cell: ModuleType, input_size: int, hidden_size: int, config=None,
               below: ModuleType | None = None) -> dict[str, tuple[int, ...]]:
        """The layer's state_dict shapes, by name, in its order."""
        width = cell.GATES * hidden_size
        shapes = {"w_ih": (width, input_size), "w_hh": (width, hidden_size), "b_ih": (width,)}
        if cell.RECURRENT_BIAS:
            shapes["b_hh"] = (width,)
        return shapes | {f"extra.{j}": (blocks * hidden_size,) for j, blocks in enumerate(cell.EXTRA.values())}

    @staticmethod
    def state_widths(cell: ModuleType, input_size: int, hidden_size: int, config=None) -> dict[str, int]:
        """The carried state's tensors by name, in order, each (B, width): the cell's STATE, H wide."""
        return {name: hidden_size for name in cell.STATE}

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
        if config.reservoir:
            with torch.no_grad():
                self.w_hh.mul_(config.spectral_radius / nonzero_radius(self.w_hh))

    def init_state(self, batch_size: int, like: Tensor) -> tuple[Tensor, ...]:
        return tuple(like.new_zeros(batch_size, self.hidden_size) for _ in self.cell.STATE)

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weight_drop: float = 0.0,
                compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run_layer(self.cell, x, state, self.w_ih, self.w_hh, self.b_ih, self.b_hh, tuple(self.extra),
                         weight_drop=weight_drop if self.training else 0.0, compute_dtype=compute_dtype)


def stack_forward(layer: nn.Module, x: Tensor, state: tuple[Tensor, ...], below: Tensor | None, weight_drop: float = 0.0,
                  compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...], Tensor | None]:
    """One layer of a stack -> y, its new state and what it hands the layer above (None from a layer
    that hands nothing up); below: what the layer underneath handed up (None for the first)."""
    if layer.passes_up:
        return layer(x, state, weight_drop, compute_dtype, below=below)
    y, state = layer(x, state, weight_drop, compute_dtype)
    return y, state, None


def stack(config) -> list[tuple[ModuleType, int, int, ModuleType | None]]:
    """Each layer of config's (a ModelConfig) stack: its cell module, input size, units, and the cell
    below it (None for the first), what `Layer` and `Layer.shapes` take."""
    from lmtrain.model.cells import get_cell

    cells = [get_cell(name) for name in config.cells]
    sizes = (config.embedding_size, *config.layer_sizes)
    return [(cell, sizes[i], sizes[i + 1], cells[i - 1] if i else None) for i, cell in enumerate(cells)]


def spectral_radius(w: Tensor) -> Tensor:
    """The largest |eigenvalue| of the square matrix w (H, H), computed in float64 (a 0-d tensor)."""
    return torch.linalg.eigvals(w.detach().double()).abs().max()


def nonzero_radius(w_hh: Tensor) -> float:
    """model.reservoir's divisor: W_hh's spectral radius, which must not be 0 (model.init_range 0)."""
    if w_hh.shape[0] != w_hh.shape[1]:
        raise LmtrainError(f"model.reservoir: W_hh must be square, got {tuple(w_hh.shape)}")
    radius = float(spectral_radius(w_hh))
    if radius == 0.0 or not math.isfinite(radius):
        raise LmtrainError(f"model.reservoir: the initial W_hh has spectral radius {radius} (model.init_range 0?): nothing to scale")
    return radius


def layer_class(cell: ModuleType) -> type[RecurrentLayer]:
    """The layer a cell runs in: its module's `Layer`, or the standard one."""
    return getattr(cell, "Layer", RecurrentLayer)


def is_standard(layer: nn.Module) -> bool:
    """Whether `layer` is the standard layer, whose weights generation and export read directly."""
    return type(layer) is RecurrentLayer
