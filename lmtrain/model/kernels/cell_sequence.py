"""Every cell but the LSTM over a whole sequence on the CPU: the generic engine's plan with its
time loops in C++ (cpu/cell_cpu.cpp), the cell's pointwise step inlined there.

    cell.sequence_kernel = SequenceKernel(name)     (the kernel interface of lmtrain.model.kernels:
                                                     supports(...) and run(...) -> y, final state)

Forward: one GEMM for the input projections of all steps (as the engine), then the C++ loop:
per step the recurrent product h_{t-1} W_hh^T into a reused buffer (our AVX-512 panels where the
CPU has them, else at::mm) and one vectorised pass of the cell's step. Backward: the C++ loop in
reverse (the step's gradients, then dh_{t-1} = d hg_t W_hh + its direct part), then one GEMM
each for dX, dW_ih and dW_hh (lmtrain.model.kernels.mixed.sequence_grads, as the engine).

Which cells have a loop here: generated_programs() (the functors generated into cell_steps.h). float32 and float64
(CellSequence), and mixed precision (MixedCellSequence: every GEMM on bfloat16 operands with
float32 sums, on a CPU with AVX512-BF16; the states, the step and every gradient float32: the
arithmetic of the engine with compute_dtype = torch.bfloat16).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from lmtrain.model.cells.equations import Program
from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.kernels.gemm import linear, plain, sequence_grads
from lmtrain.model.kernels.lstm import LOW, SEQUENCE_PANELS_MIN_HIDDEN, mixed_available



@cache
def generated_programs() -> dict[str, Program]:
    """The cells whose CPU loop is here, by name, in the order of their functors in the generated
    cell_steps.h (lmtrain.model.kernels.emit_cpp): every cell of config.CELLS whose
    sequence_kernel is a SequenceKernel."""
    from lmtrain.model.cells import CELLS  # the cells import this module

    return {name: cell.STEP.program() for name, cell in CELLS.items() if isinstance(getattr(cell, "sequence_kernel", None), SequenceKernel)}


def functor_index(name: str) -> int:
    return list(generated_programs()).index(name)


def recurrent_form(ops, weight: Tensor) -> tuple[Tensor, int]:
    """W (N, K) as the loops take it: our panels (mode 2) for float32 where the CPU has them,
    else the tensor itself (mode 0, at::mm)."""
    if weight.dtype == torch.float32 and ops.panels_available(False):
        return ops.pack_panels(weight.detach()), 2
    return weight.detach().contiguous(), 0


def state_buffers(state: tuple[Tensor, ...], steps: int) -> list[Tensor]:
    """One (T+1, B, H) buffer per state tensor, its row 0 the initial state: what the loops fill."""
    buffers = [s.new_empty(steps + 1, *s.shape) for s in state]
    for buffer, initial in zip(buffers, state):
        buffer[0] = initial
    return buffers


def outputs_view(hs: Tensor) -> Tensor:
    """y (T, B, H): rows 1.. of the h buffer the backward keeps anyway, not a copy of them. Autograd
    marks a view made inside a Function so that changing it in place is an error, never a silent
    change to what the backward reads."""
    return hs[1:]


def gradient_buffers(name: str, like: Tensor, steps: int, batch: int, width: int) -> tuple[Tensor, Tensor]:
    """dxg, dhg (T, B, GH) for the backward loop: one tensor for both pre-activations where the
    cell's gradients are the same (all but the GRU's)."""
    dxg = like.new_empty(steps, batch, width)
    return dxg, (dxg if generated_programs()[name].shared_gradient else like.new_empty(steps, batch, width))


def flat(dxg: Tensor, dhg: Tensor) -> tuple[Tensor, Tensor]:
    """The two gradients as (T·B, GH) matrices, one object where they are one tensor."""
    flat_xg = dxg.view(-1, dxg.size(-1))
    return flat_xg, (flat_xg if dhg is dxg else dhg.view(-1, dhg.size(-1)))


def per_parameter(d_first: list[Tensor], n_state: int, extra) -> list[Tensor]:
    """The backward loop's results (the initial states' gradients, then every per-unit block's in
    one tensor) with that last one split into one gradient per parameter."""
    if not extra:
        return list(d_first)
    return [*d_first[:n_state], *d_first[n_state].split([e.numel() for e in extra])]


def bias_grads(flat_xg: Tensor, flat_hg: Tensor, has_b_hh: bool) -> tuple[Tensor, Tensor | None]:
    db_ih = flat_xg.sum(0)
    return db_ih, ((db_ih if flat_hg is flat_xg else flat_hg.sum(0)) if has_b_hh else None)


class CellSequence(torch.autograd.Function):
    """outputs = CellSequence.apply(name, n_state, x, w_ih, w_hh, b_ih, b_hh, *state, *extra):
    y (T, B, H) followed by the final state tensors, as lmtrain.model.recurrence.Recurrence."""

    @staticmethod
    def forward(ctx, name: str, n_state: int, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh, *rest):
        state, extra = rest[:n_state], [e.detach().contiguous() for e in rest[n_state:]]
        ops, (steps, batch, inputs), (width, hidden) = cpu_ops(), x.shape, w_hh.shape
        xg = linear(x.reshape(steps * batch, inputs), plain(w_ih), bias=b_ih).view(steps, batch, width)
        states = state_buffers(state, steps)
        saved = x.new_empty(steps, batch, len(generated_programs()[name].saved) * hidden)
        w_form, mode = recurrent_form(ops, w_hh)
        ops.cell_forward_loop(functor_index(name), xg, states, saved, w_form, mode,
                              b_hh.detach().contiguous() if b_hh is not None else None, extra)
        ctx.name, ctx.has_b_hh, ctx.n_state, ctx.n_extra = name, b_hh is not None, n_state, len(extra)
        ctx.save_for_backward(x, w_ih, w_hh, saved, *states, *extra)
        return (outputs_view(states[0]), *(s[-1].clone() for s in states))

    @staticmethod
    def backward(ctx, dy: Tensor, *d_final):
        x, w_ih, w_hh, saved, *rest = ctx.saved_tensors
        states, extra = rest[: ctx.n_state], rest[ctx.n_state :]
        ops = cpu_ops()
        steps, batch, _ = x.shape
        width, hidden = w_hh.shape
        dxg, dhg = gradient_buffers(ctx.name, dy, steps, batch, width)
        w_form, mode = recurrent_form(ops, w_hh.t())
        d_first = ops.cell_backward_loop(functor_index(ctx.name), states, saved, dy,
                                         [torch.zeros(batch, hidden, dtype=x.dtype) if d is None else d for d in d_final],
                                         w_form, mode, dxg, dhg, list(extra))
        del w_form  # packed for the loop only
        grads = list(flat(dxg, dhg))
        del dxg, dhg  # sequence_grads releases each gradient once read
        biases = bias_grads(*grads, ctx.has_b_hh)
        dx, dw_ih, dw_hh = sequence_grads(ops, grads, x.reshape(steps * batch, -1),
                                          states[0][:-1].reshape(steps * batch, hidden), w_ih, ctx.needs_input_grad[2],
                                          mode == 2 and hidden >= SEQUENCE_PANELS_MIN_HIDDEN)
        return (None, None, dx.view_as(x) if dx is not None else None, dw_ih, dw_hh,
                *biases, *per_parameter(d_first, ctx.n_state, extra))


class MixedCellSequence(torch.autograd.Function):
    """CellSequence in mixed precision: the weights rounded to bfloat16 once per call, x, each
    h_{t-1} and each step's dhg as they are used; float32 sums, states and gradients."""

    @staticmethod
    def forward(ctx, name: str, n_state: int, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh, *rest):
        state, extra = rest[:n_state], [e.detach().contiguous() for e in rest[n_state:]]
        ops, (steps, batch, inputs), (width, hidden) = cpu_ops(), x.shape, w_hh.shape
        x_low = x.detach().reshape(steps * batch, inputs).to(LOW)
        w_ih_low, w_hh_low = w_ih.detach().to(LOW), w_hh.detach().to(LOW)
        xg = ops.panels_matmul(x_low, ops.pack_panels(w_ih_low), width, torch.float32).add_(b_ih.detach())
        states = state_buffers(state, steps)
        hs_low = x_low.new_empty(steps + 1, batch, hidden)  # h_t rounded: the products' operands
        hs_low[0] = state[0]
        saved = x.new_empty(steps, batch, len(generated_programs()[name].saved) * hidden)
        ops.cell_forward_loop(functor_index(name), xg.view(steps, batch, width), states, saved, ops.pack_panels(w_hh_low), 2,
                              b_hh.detach().contiguous() if b_hh is not None else None, extra, hs_low)
        ctx.name, ctx.has_b_hh, ctx.n_state, ctx.input_shape = name, b_hh is not None, n_state, x.shape
        ctx.save_for_backward(x_low, w_ih_low, w_hh_low, hs_low, saved, *states, *extra)
        return (outputs_view(states[0]), *(s[-1].clone() for s in states))

    @staticmethod
    def backward(ctx, dy: Tensor, *d_final):
        x_low, w_ih_low, w_hh_low, hs_low, saved, *rest = ctx.saved_tensors
        states, extra = rest[: ctx.n_state], rest[ctx.n_state :]
        ops = cpu_ops()
        steps, batch, inputs = ctx.input_shape
        width, hidden = w_hh_low.shape
        dxg, dhg = gradient_buffers(ctx.name, dy, steps, batch, width)
        d_first = ops.cell_backward_loop(functor_index(ctx.name), states, saved, dy, list(d_final),
                                         ops.pack_panels(w_hh_low.t()), 2, dxg, dhg, list(extra),
                                         x_low.new_empty(batch, width))
        flat_xg, flat_hg = flat(dxg, dhg)
        del dxg, dhg  # from here each buffer goes once its bfloat16 copy or last product has read it
        biases = bias_grads(flat_xg, flat_hg, ctx.has_b_hh)
        xg_low = flat_xg.to(LOW)
        hg_low = xg_low if flat_hg is flat_xg else flat_hg.to(LOW)
        del flat_xg, flat_hg
        dx = ops.panels_matmul(xg_low, ops.pack_panels(w_ih_low.t()), inputs, torch.float32).view(ctx.input_shape) \
            if ctx.needs_input_grad[2] else None
        xg_t = ops.transpose(xg_low)  # (GH, T·B)
        hg_t = xg_t if hg_low is xg_low else ops.transpose(hg_low)
        del xg_low, hg_low
        dw_ih = ops.panels_matmul(xg_t, ops.pack_panels(x_low.t()), inputs, torch.float32)
        del xg_t
        dw_hh = ops.panels_matmul(hg_t, ops.pack_panels(hs_low[:-1].reshape(steps * batch, hidden).t()), hidden, torch.float32)
        return (None, None, dx, dw_ih, dw_hh, *biases, *per_parameter(d_first, ctx.n_state, extra))


class SequenceKernel:
    """The whole-sequence kernel interface of lmtrain.model.kernels (`cell.sequence_kernel`) for
    one cell's loop here."""

    def __init__(self, name: str):
        self.name = name

    def supports(self, x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype=None) -> bool:
        if compute_dtype is not None:
            return mixed_available(x)
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and cpu_ops() is not None

    def run(self, x, state, w_ih, w_hh, b_ih, b_hh=None, extra=(), compute_dtype=None):
        sequence = MixedCellSequence if compute_dtype is not None else CellSequence
        outputs = sequence.apply(self.name, len(state), x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
        return outputs[0], tuple(outputs[1:])
