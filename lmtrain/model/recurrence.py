"""The recurrence engine: any cell over T steps, with hand-written backpropagation through time.

A cell (a module in lmtrain/model/cells/) supplies its gate count G, its state names (h first: h is the
layer's output), whether it keeps a separate recurrent bias, its extra per-unit parameters, and
two per-step functions: `forward_step` and `backward_step`. The engine does the rest:

Forward:
  1. one GEMM for the input projections of all steps:   xg = x W_ih^T + b_ih        (T, B, GH)
  2. per step t: one GEMM for the recurrent projection:  hg = h_{t-1} W_hh^T (+ b_hh) (B, GH),
     then the cell's pointwise forward turns (xg[t], hg, state_{t-1}) into state_t.
Backward, steps in reverse:
  per step: the cell's pointwise backward gives d xg[t], d hg[t] and the gradient of state_{t-1};
  one GEMM carries d hg[t] back to h_{t-1}: dh_{t-1} += d hg[t] W_hh.
  Then one GEMM each for dW_ih = dXG^T X, dW_hh = dHG^T H_prev and dX = dXG W_ih.

A cell may also offer `sequence_kernel`: a faster forward/backward over the whole sequence
(see lmtrain/model/kernels/); on CUDA every cell takes lmtrain.model.kernels.fused instead: the same
loop with each step's pointwise work compiled into one kernel and the per-step GEMMs into reused
buffers. lmtrain.model.kernels.dispatch chooses, for each call of `run_layer`, and says why; every
path computes the same thing as the loop above.

Mixed precision (`compute_dtype` = torch.bfloat16, train.precision = bf16): every GEMM above takes bfloat16
operands and gives float32 sums (lmtrain.model.kernels.mixed); the cell's pointwise steps, its state
and the weight gradients stay float32.

Everything here is device-agnostic torch code.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from lmtrain.errors import LmtrainError
from lmtrain.model.kernels import dispatch, fused, mixed, selfcheck
from lmtrain.model.kernels.dispatch import ZONED_PATHS
from lmtrain.model.zoneout import Zone, Zoned


class Recurrence(torch.autograd.Function):
    """outputs = Recurrence.apply(cell, n_state, compute_dtype, x, w_ih, w_hh, b_ih, b_hh, *state, *extra).

    cell: a cell module, whose forward_step and backward_step run as they are, or
    lmtrain.model.kernels.fused.CompiledSteps(cell), whose steps run compiled (the fused path);
    the loop, its GEMMs and its reused buffers (fused.scratch) are the same for both. Either
    wrapped in lmtrain.model.zoneout.Zoned(·, zone): the window's zoneout mixes each step's new
    state with the previous one (zone.mix) before it is carried and output, and the backward
    splits each step's state gradient (zone.mix_backward) between the two.

    compute_dtype: None or torch.bfloat16 (mixed precision's GEMM operands, lmtrain.model.kernels.mixed);
    x: (T, B, I); w_ih: (GH, I); w_hh: (GH, H); b_ih: (GH,); b_hh: (GH,) or None;
    state: n_state tensors (B, H); extra: the cell's per-unit parameters.
    outputs: y (T, B, H) followed by the n_state final state tensors (B, H).
    """

    @staticmethod
    def forward(ctx, cell: ModuleType, n_state: int, compute_dtype, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh, *rest):
        state, extra = tuple(rest[:n_state]), tuple(rest[n_state:])
        steps, batch, inputs = x.shape
        width, hidden = w_hh.shape
        w_ih, w_hh = mixed.operand(w_ih, compute_dtype), mixed.operand(w_hh, compute_dtype)
        # (T, B, GH): the input projections of all steps in one GEMM, into a reused buffer
        xg = fused.scratch("xg", (steps, batch, width), x)
        mixed.mm(mixed.operand(x.reshape(steps * batch, inputs), compute_dtype), w_ih.t(), b_ih, out=xg.view(steps * batch, width))
        hg = fused.scratch("hg", (batch, width), x)  # (B, GH): each step's recurrent GEMM lands here
        w_hh_t = w_hh.t()
        ys = x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T: the output and dW_hh's operand
        ys[0] = state[0]
        states, saved = [state], []
        zone, news = getattr(cell, "zone", None), []  # zoneout: each step's own new state, before the mix
        step = None
        for t in range(steps):
            mixed.mm(mixed.operand(state[0], compute_dtype), w_hh_t, b_hh, out=hg)
            if step is None:
                step = step_of(cell, "forward", (xg[t], hg, state, extra))
            new, step_saved = step(xg[t], hg, state, extra)
            if zone is not None:
                news.append(new)
                new = zone.mix(t, state, new)
            state = new
            ys[t + 1] = state[0]
            states.append(state)
            saved.append(step_saved)
        ctx.cell, ctx.has_b_hh, ctx.compute_dtype = cell, b_hh is not None, compute_dtype
        ctx.states, ctx.saved, ctx.news = states, saved, news  # per-step tuples: plain lists, not autograd inputs
        ctx.save_for_backward(x, w_ih, w_hh, ys, *extra)  # the weights as the products took them
        return (ys[1:].clone(), *(s.clone() for s in state))

    @staticmethod
    def backward(ctx, dy: Tensor, *d_final):
        x, w_ih, w_hh, ys, *extra = ctx.saved_tensors
        extra = tuple(extra)
        cell, compute_dtype = ctx.cell, ctx.compute_dtype
        steps, batch, inputs = x.shape
        width, hidden = w_hh.shape
        d_state = list(d_final)
        dxg = fused.scratch("dxg", (steps, batch, width), ys)
        dhg = None  # dxg itself for cells whose two pre-activation gradients are one tensor
        # dh_{t-1} = d hg_t W_hh (+ the direct part) alternates between two (B, H) buffers, so a
        # step never writes the tensor it reads
        dh_buffers = (fused.scratch("dh0", (batch, hidden), ys), fused.scratch("dh1", (batch, hidden), ys))
        d_extra = [torch.zeros_like(e) for e in extra]
        zone = getattr(cell, "zone", None)
        step = None
        for t in reversed(range(steps)):
            d_state[0] = d_state[0] + dy[t]
            direct = None  # zoneout: the part of d_state that goes straight to state_{t-1}
            if zone is not None:
                direct, d_state = zone.mix_backward(t, ctx.states[t], ctx.news[t], d_state)
            args = (tuple(d_state), ctx.saved[t], ctx.states[t], extra)
            if step is None:
                step = step_of(cell, "backward", args)
            dxg_t, dhg_t, d_prev, d_extra_t = step(*args)
            if dhg is None:
                shared = dhg_t is dxg_t or (dhg_t.data_ptr() == dxg_t.data_ptr() and dhg_t.stride() == dxg_t.stride())
                dhg = dxg if shared else fused.scratch("dhg", (steps, batch, width), ys)
            dxg[t] = dxg_t
            if dhg is not dxg:
                dhg[t] = dhg_t
            d_state = list(d_prev)
            if direct is not None:
                d_state = [d if a is None else a if d is None else d + a for d, a in zip(d_state, direct)]
            d_state[0] = mixed.mm(mixed.operand(dhg[t], compute_dtype), w_hh, d_state[0], out=dh_buffers[t % 2])
            for acc, d in zip(d_extra, d_extra_t):
                acc += d
        dx, dw_ih, dw_hh, db_ih, db_hh = mixed.sequence_grads(dxg, dhg, x, ys[:-1], w_ih, compute_dtype, ctx.needs_input_grad[3])
        db_hh = db_hh if ctx.has_b_hh else None
        d_state[0] = d_state[0].clone()  # the returned gradient must not be a reused buffer
        return (None, None, None, dx, dw_ih, dw_hh, db_ih, db_hh, *d_state, *d_extra)


def step_of(cell, which: str, args: tuple):
    """The step function the engine runs for `cell`: its own `forward_step` / `backward_step`, or
    the compiled one a fused.CompiledSteps resolves for these arguments."""
    resolve = getattr(cell, "resolve", None)
    return resolve(which, args) if resolve is not None else getattr(cell, f"{which}_step")


def run_layer(cell: ModuleType, x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor, b_hh: Tensor | None = None, extra: tuple[Tensor, ...] = (), *, weight_drop: float = 0.0,
              compute_dtype: torch.dtype | None = None, zoneout: Zone | None = None):
    """Run `cell` over x (T, B, I) from `state` -> y (T, B, H) and the final state (a tuple).

    compute_dtype: torch.bfloat16 for mixed precision (bfloat16 GEMM operands, everything else float32), or
    None; ignored unless x is float32.

    weight_drop: DropConnect on the recurrent weight (Wan et al. 2013, as AWD-LSTM uses it): each
    entry of w_hh is zeroed with this probability, the rest scaled by 1 / (1 - p), one mask for the
    whole sequence; w_hh's gradient is masked the same way. 0 (inference) leaves w_hh as it is.

    zoneout: the window's lmtrain.model.zoneout.Zone (its masks, or its p at evaluation), or None.
    It runs inside the engine's loop (the engine, or the fused path's compiled steps): dispatch
    passes over the paths that do not know it (the sequence kernels, the persistent LSTM).
    """
    if weight_drop:
        w_hh = torch.nn.functional.dropout(w_hh, weight_drop, True)
    if x.dtype != torch.float32:
        compute_dtype = None
    args = (x, state, w_ih, w_hh, b_ih, b_hh, tuple(extra))
    zoned = zoneout is not None
    choice = checked_choice(cell, args, compute_dtype, zoned)
    try:
        return run_path(choice.path, cell, args, compute_dtype, zoneout)
    except (torch.OutOfMemoryError, LmtrainError):
        raise
    except Exception as error:  # noqa: BLE001  a fast path that fails after its check: the next one down
        if choice.path == "engine":
            raise
        selfcheck.turn_off(choice.path, selfcheck.raised(error),
                           lambda: f"the {dispatch.choose(cell, *args, compute_dtype=compute_dtype, zoneout=zoned).path} path")
        return run_path(checked_choice(cell, args, compute_dtype, zoned).path, cell, args, compute_dtype, zoneout)


def run_path(path: str, cell: ModuleType, args: tuple, compute_dtype: torch.dtype | None, zoneout: Zone | None = None):
    """run_layer's call (args: x, state, w_ih, w_hh, b_ih, b_hh, extra) on one path -> y, final state."""
    x, state, w_ih, w_hh, b_ih, b_hh, extra = args
    if zoneout is not None and path not in ZONED_PATHS:
        raise ValueError(f"the {path} path does not apply zoneout (lmtrain.model.kernels.dispatch chooses among {ZONED_PATHS})")
    if path != "engine":
        selfcheck.inject(path)
    if path == "persistent":  # the LSTM's whole time loop in one kernel launch each way
        from lmtrain.model.kernels.cuda import lstm_persistent

        y, final = lstm_persistent.run(x, state, w_ih, w_hh, b_ih, compute_dtype)
    elif path == "sequence":
        y, final = cell.sequence_kernel.run(x, state, w_ih, w_hh, b_ih, b_hh, extra, compute_dtype)
    else:
        steps = fused.CompiledSteps(cell, triton=path == "triton") if path in ("fused", "triton") else cell
        steps = Zoned(steps, zoneout) if zoneout is not None else steps
        outputs = Recurrence.apply(steps, len(state), compute_dtype, x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
        y, final = outputs[0], tuple(outputs[1:])
    if path == "engine":
        return y, final
    y, *final = selfcheck.distort(path, (y, *final))
    return y, tuple(final)


def checked_choice(cell: ModuleType, args: tuple, compute_dtype: torch.dtype | None, zoned: bool = False) -> dispatch.Choice:
    """dispatch.choose's path for this call, once it has passed its self-check for this kind of call
    (lmtrain.model.kernels.selfcheck): a path that fails is turned off and the next one down is
    taken (and checked), down to the engine, which is the reference. zoned: the call has zoneout
    (dispatch then chooses among ZONED_PATHS; the check is of the steps, without it)."""
    choice = dispatch.choose(cell, *args, compute_dtype=compute_dtype, zoneout=zoned)
    while choice.path != "engine":
        key = check_key(cell, args, compute_dtype)
        if not selfcheck.pending(choice.path, key):  # checked before: the usual case, no check built
            return choice
        failure = selfcheck.check(choice.path, key, *check_calls(choice.path, cell, args, compute_dtype))
        if failure is None:
            return choice
        selfcheck.turn_off(choice.path, failure,
                           lambda: f"the {dispatch.choose(cell, *args, compute_dtype=compute_dtype, zoneout=zoned).path} path")
        choice = dispatch.choose(cell, *args, compute_dtype=compute_dtype, zoneout=zoned)
    return choice


def check_key(cell: ModuleType, args: tuple, compute_dtype: torch.dtype | None) -> tuple:
    """What a check holds for: everything about a call but its window length."""
    x, state, w_ih, w_hh, b_ih, b_hh, extra = args
    return (dispatch.cell_name(cell), x.device, x.dtype, compute_dtype, tuple(x.shape[1:]),
            tuple(w_hh.shape), b_hh is not None, len(extra))


def check_calls(path: str, cell: ModuleType, args: tuple, compute_dtype: torch.dtype | None) -> tuple:
    """(fast, reference, inputs, tolerance) for selfcheck.check: the call's first CHECK_STEPS steps
    on `path` and on the engine, as functions of the flat tensors (x, *state, w_ih, w_hh, b_ih,
    [b_hh], *extra) -> (y, *final state)."""
    x, state, w_ih, w_hh, b_ih, b_hh, extra = args
    n, has_b_hh = len(state), b_hh is not None
    inputs = [x[: selfcheck.CHECK_STEPS], *state, w_ih, w_hh, b_ih, *([b_hh] if has_b_hh else []), *extra]

    def on(which: str):
        def run(x, *rest):
            state, (w_ih, w_hh, b_ih), rest = tuple(rest[:n]), rest[n : n + 3], rest[n + 3 :]
            b_hh, extra = (rest[0], rest[1:]) if has_b_hh else (None, rest)
            y, final = run_path(which, cell, (x, state, w_ih, w_hh, b_ih, b_hh, tuple(extra)), compute_dtype)
            return (y, *final)

        return run

    return on(path), on("engine"), inputs, selfcheck.tolerance(x.dtype, compute_dtype)
