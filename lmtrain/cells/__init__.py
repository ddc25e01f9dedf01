"""Recurrent cells. Each module holds one cell's equations as plain autograd (`reference`) and the
per-step pointwise forward and backward that the engine in `lmtrain.recurrence` calls; see there
for the interface. Adding a cell means adding a module here and a line to CELLS."""

from types import ModuleType

from lmtrain.cells import lstm

CELLS: dict[str, ModuleType] = {"lstm": lstm}


def get_cell(name: str) -> ModuleType:
    return CELLS[name]
