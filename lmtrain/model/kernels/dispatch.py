"""The one place that decides which path runs a recurrent layer, and reads every switch that bears
on it. Every other module asks here; `explain` says what was chosen and why (for `lmtrain doctor`).

    path         what runs                                                     where it is chosen
    persistent   the LSTM's whole window in one Triton launch each way         CUDA (or Triton's CPU
                 (model/kernels/cuda/lstm_persistent.py)                      interpreter), LMTRAIN_PERSISTENT=1
    fused        the engine's loop with each step's pointwise work compiled     every cell on CUDA;
                 (model/kernels/fused.py; its pointwise steps: compile, or      the CPU with LMTRAIN_FUSED=1
                 the LSTM's Triton kernels with LMTRAIN_CUDA_POINTWISE=triton)
    sequence     the cell's own whole-sequence kernel (the LSTM's: our C++     the LSTM without a recurrent
                 loops, model/kernels/lstm.py, or their Python version)       bias or extras, when kernels are on
    engine       the generic engine with the cell's per-step functions         everything else
                 (model/recurrence.py)
    own          a cell without a STEP runs its own layer (its module's Layer;  that cell (mogrifier,
                 not through run_layer)                                        qrnn), always

Every path computes what the engine computes; the tests hold each to it.

Switches (read at each call, so tests can set them):
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from lmtrain.errors import LmtrainError

# name -> (default, choices or None for a flag of "0"/"1", meaning)
SWITCHES: dict[str, tuple[str, tuple[str, ...] | None, str]] = {
    "LMTRAIN_COMPILE": ("1", None, "0: never build or load our C++ ops; every caller runs its Python version"),
    "LMTRAIN_KERNELS": ("1", None, "0: no sequence kernel and no fused cross-entropy: the generic engine"),
    "LMTRAIN_FUSED": ("0", None, "1: the fused path on the CPU too (on CUDA it is always taken)"),
    "LMTRAIN_FUSED_MODE": ("compile", ("compile", "traced", "eager"),
                           "the fused path's pointwise steps: compiled by torch.compile, traced graphs run "
                           "without inductor (CPU tests), or the cells' functions as they are"),
    "LMTRAIN_CUDA_POINTWISE": ("compile", ("compile", "triton"), "the LSTM's fused steps on CUDA: compiled, or our Triton kernels"),
    "LMTRAIN_PERSISTENT": ("0", None, "1: the LSTM's window in one persistent launch each way (CUDA)"),
    # lmtrain.model.kernels.selfcheck's; the last two take a comma-separated list of its PATHS
    "LMTRAIN_SELF_CHECK": ("1", None, "0: no check of a fast path against the reference on first use (benchmarks)"),
    "LMTRAIN_DISABLE": ("", None, "these paths off from the start, e.g. sequence,cross-entropy"),
    "LMTRAIN_FAULT": ("", None, "FOR TESTS ONLY: path:raise or path:wrong makes a path fail, to test the fallback"),
}
__doc__ += "".join(f"    {name:24} {meaning} (default {default})\n" for name, (default, _, meaning) in SWITCHES.items())


def switch(name: str) -> str:
    """The value of one switch, its default when unset; a value it does not take is one error line."""
    default, choices, _ = SWITCHES[name]
    value = os.environ.get(name, default)
    allowed = choices or ("0", "1")
    if choices is not None and value not in allowed:
        raise LmtrainError(f"{name} must be one of {', '.join(allowed)}, got '{value}'")
    return value


def on(name: str) -> bool:
    """A flag switch: anything but "0" is on for those that default on, only "1" for the others."""
    value = switch(name)
    return value != "0" if SWITCHES[name][0] == "1" else value == "1"


def cell_name(cell: ModuleType) -> str:
    """A cell module's name in lmtrain.config.CELLS ("lstm", "gru", ...): the one way to tell cells apart."""
    return cell.__name__.rsplit(".", 1)[-1]


def on_engine(cell: ModuleType) -> bool:
    """Whether `cell` runs on the recurrence engine and its paths (this module's choice): it has a
    STEP, from which its forward_step / backward_step are generated. A cell without one (mogrifier,
    qrnn) runs its own layer's loop (its module's `Layer`), path "own"."""
    return hasattr(cell, "STEP")


def is_lstm(cell: ModuleType) -> bool:
    return cell_name(cell) == "lstm"


def on_triton(x: Tensor) -> bool:
    """Whether Triton kernels can run for x: on CUDA, or under Triton's CPU interpreter (tests)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Choice:
    path: str  # "persistent", "triton", "fused", "sequence" or "engine"; explain: "own" (not on_engine)
    reason: str


def triton_steps(name: str, x: Tensor) -> bool:
    """Whether the fused loop takes the LSTM's hand-written Triton step kernels for x."""
    return (name == "lstm" and on_triton(x) and switch("LMTRAIN_CUDA_POINTWISE") == "triton"
            and switch("LMTRAIN_FUSED_MODE") != "eager")


def choose(cell: ModuleType, x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
           b_hh: Tensor | None, extra: tuple[Tensor, ...], *, compute_dtype: torch.dtype | None) -> Choice:
    """The path for one layer's call (lmtrain.model.recurrence.run_layer's arguments), and why.
    A path lmtrain.model.kernels.selfcheck turned off is passed over for the next one down."""
    from lmtrain.model.kernels.selfcheck import turned_off

    off = turned_off()
    passed_over = []

    def usable(path: str) -> bool:
        if path in off:
            passed_over.append(f"the {path} path is off: {off[path]}")
        return path not in off

    def choice(path: str, reason: str) -> Choice:
        return Choice(path, "; ".join([reason, *passed_over]))

    name = cell_name(cell)
    if x.is_cuda or on("LMTRAIN_FUSED"):
        where = "on CUDA" if x.is_cuda else "with LMTRAIN_FUSED=1"
        if on_triton(x) and on("LMTRAIN_PERSISTENT"):
            from lmtrain.model.kernels.cuda import lstm_persistent

            if lstm_persistent.supports(name, x, b_hh, extra) and usable("persistent"):
                return choice("persistent", f"{name} {where} with LMTRAIN_PERSISTENT=1")
        if triton_steps(name, x) and usable("triton"):
            return choice("triton", f"the LSTM takes the fused loop {where} with its Triton steps (LMTRAIN_CUDA_POINTWISE=triton)")
        if usable("fused"):
            return choice("fused", f"every cell takes the fused loop {where} (pointwise steps: {switch('LMTRAIN_FUSED_MODE')})")
    kernel = getattr(cell, "sequence_kernel", None)
    if kernel is None:
        return choice("engine", f"{name} has no sequence kernel of its own")
    if not on("LMTRAIN_KERNELS"):
        return choice("engine", "LMTRAIN_KERNELS=0 turns the sequence kernels off")
    if not kernel.supports(x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype):
        return choice("engine", f"{name}'s sequence kernel does not take these tensors (a recurrent bias, extras, "
                                "or bf16 without the CPU's bf16 products)")
    if not usable("sequence"):
        return choice("engine", "the generic engine")
    from lmtrain.model.kernels.build import cpu_ops

    how = "our C++ loops" if x.device.type == "cpu" and cpu_ops() is not None else "their Python version"
    return choice("sequence", f"{name}'s own sequence kernel ({how})")


def explain(cell: ModuleType, device: torch.device, compute_dtype: torch.dtype | None = None, batch: int = 2, hidden: int = 8) -> Choice:
    """`choose` for a layer of `hidden` units over `batch` streams on `device`, without a model:
    what `lmtrain doctor` reports per cell, device and precision; "own" for a cell not on the engine."""
    if not on_engine(cell):
        return Choice("own", f"{cell_name(cell)} runs its own layer ({cell.__name__}.Layer)")
    gates = cell.GATES * hidden
    x = torch.zeros(3, batch, hidden, device=device)
    state = tuple(torch.zeros(batch, hidden, device=device) for _ in cell.STATE)
    w = torch.zeros(gates, hidden, device=device)
    b_hh = torch.zeros(gates, device=device) if cell.RECURRENT_BIAS else None
    extra = tuple(torch.zeros(blocks * hidden, device=device) for blocks in cell.EXTRA.values())
    return choose(cell, x, state, w, w, torch.zeros(gates, device=device), b_hh, extra, compute_dtype=compute_dtype)
