"""Recurrent cells. Each module holds one cell's equations as plain autograd (`reference`) and the
per-step pointwise forward and backward that the engine in `lmtrain.model.recurrence` calls; see there
for the interface.

The cells are the names of lmtrain.config.CELLS (what `model.cell` may be), each the module of
that name here. Adding a cell means adding its module here and its name to config.CELLS (and,
for its fast loop on the CPU, a step functor in lmtrain/model/kernels/cpu/cell_cpu.cpp: docs/cells.md)."""

import importlib
from types import ModuleType

from lmtrain import config

CELLS: dict[str, ModuleType] = {name: importlib.import_module(f"{__name__}.{name}") for name in config.CELLS}


def get_cell(name: str) -> ModuleType:
    return CELLS[name]
