"""The plain (Elman) recurrent cell with tanh: one H-wide block, one bias.

    h' = tanh(W x + U h + b)

PyTorch's RNN module (nonlinearity "tanh") computes the same with two biases; ours is their sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmtrain.model.cells.equations import Step
from lmtrain.model.kernels.cell_sequence import SequenceKernel
from lmtrain.model.kernels.emit_torch import engine_steps



def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh=None, extra=()):
    """The equation in plain autograd: x (T, B, I) -> y (T, B, H), final (h,)."""
    (h,) = state
    outputs = []
    for x_t in x:
        h = torch.tanh(x_t @ w_ih.t() + h @ w_hh.t() + b_ih)
        outputs.append(h)
    return torch.stack(outputs), (h,)


def equations(x, u, s, p, f):
    """h' = tanh(W x + U h + b)"""
    return {"h": f.tanh(x.a + u.a)}


STEP = Step(gates=("a",), states=("h",), equations=equations)
GATES, STATE, RECURRENT_BIAS, EXTRA = STEP.layout()
forward_step, backward_step = engine_steps(STEP, __name__)  # the engine's per-step functions, generated
sequence_kernel = SequenceKernel("rnn")  # the C++ time loop on the CPU (lmtrain/model/kernels/cpu/cell_cpu.cpp)
