"""Recurrent cells. Each module holds one cell's equations as plain autograd (`reference`) and the
per-step pointwise forward and backward that the engine in `lmtrain.model.recurrence` calls; see there
for the interface. Adding a cell means adding a module here and a line to CELLS."""

from types import ModuleType

from lmtrain.model.cells import coupled, gru, lstm, peephole, rnn, slstm

CELLS: dict[str, ModuleType] = {
    "lstm": lstm,
    "peephole": peephole,
    "coupled": coupled,
    "gru": gru,
    "rnn": rnn,
    "slstm": slstm,
}


def get_cell(name: str) -> ModuleType:
    return CELLS[name]
