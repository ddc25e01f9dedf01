"""The engine's sequence loop for any cell with each step's pointwise work fused into one kernel:
the path every cell takes on CUDA (and on the CPU when forced, for tests).

Same arithmetic as lmtrain.model.recurrence.Recurrence, organised for a GPU:

  - the cell's own `forward_step` and `backward_step` (lmtrain/model/cells/) are traced to ATen graphs
    (make_fx; functionalize turns their in-place and `out=` writes into pure ops) and compiled by
    `torch.compile` (inductor: Triton kernels on CUDA, C++ on the CPU), once per cell, step
    function, shapes, dtype and device, with fullgraph=True and dynamic=False, and cached;
    for the LSTM on CUDA, hand-written Triton kernels can stand in (LMTRAIN_CUDA_POINTWISE=triton,
    lmtrain/model/kernels/cuda/lstm_triton.py);
  - every recurrent GEMM writes into a buffer allocated once per shape (cuBLAS on CUDA):
    hg = h_{t-1} W_hh^T (+ b_hh) per forward step, dh_{t-1} = d hg_t W_hh per backward step;
  - input projections, dX and the weight gradients are one large GEMM each, as in the engine;
  - with train.precision = bf16 every GEMM takes bfloat16 operands and gives float32 sums
    (cuBLAS, lmtrain.model.kernels.mixed); the compiled pointwise steps and the state stay float32.

Selection (lmtrain.model.kernels.dispatch reads the switches, at each call, so tests can set them):
  LMTRAIN_FUSED=1           use this path on the CPU too (on CUDA it is always used)
  LMTRAIN_FUSED_MODE        compile (default) | traced (the same traced graphs, run without
                            inductor: for CPU tests) | eager (the cells' functions as they are)
  LMTRAIN_CUDA_POINTWISE    compile (default) | triton (LSTM only). Which is faster is to be
                            chosen by measurement on a GPU (lmtrain bench --device cuda); not yet done.
  LMTRAIN_PERSISTENT=1      the LSTM's whole window in one launch each way
                            (lmtrain/model/kernels/cuda/lstm_persistent.py); off until timed on a GPU.

When tracing or compiling fails, the step runs eagerly with a warning, once per key.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lmtrain.model.kernels import dispatch, mixed

MODES = ("compile", "traced", "eager")
POINTWISE = ("compile", "triton")

# (cell, "forward" | "backward", mode, leaf shapes, dtypes, device) -> a callable with the step
# function's signature. An explicit module-level cache: compiling costs seconds, a call microseconds.
_STEP_CACHE: dict[tuple, Callable] = {}
# (name, shape, dtype, device) -> a scratch tensor that holds nothing between calls (see scratch())
_SCRATCH: dict[tuple, Tensor] = {}


def fused_mode() -> str:
    return dispatch.switch("LMTRAIN_FUSED_MODE")


def cuda_pointwise() -> str:
    return dispatch.switch("LMTRAIN_CUDA_POINTWISE")


def scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A buffer allocated once per (name, shape, dtype, device) and reused by every later call.

    Only for values that are dead when the autograd function returns (the per-step GEMM outputs,
    the input projections, the gradients of the pre-activations): layers of the same shape share
    them, one after the other, which is safe because each call finishes with them before the next
    starts (same stream on CUDA).
    """
    key = (name, tuple(shape), like.dtype, like.device)
    buffer = _SCRATCH.get(key)
    if buffer is None:
        buffer = _SCRATCH[key] = like.new_empty(shape)
    return buffer


def clear_caches() -> None:
    """Forget compiled steps and scratch buffers (tests; freeing GPU memory)."""
    _STEP_CACHE.clear()
    _SCRATCH.clear()


def step_function(cell: ModuleType, which: str, args: tuple, mode: str | None = None) -> Callable:
    """The cell's `which` ("forward" or "backward") step as one fused function, for args like `args`.

    mode: compile (traced, then inductor), traced (the functionalized ATen graph, run as it is),
    eager (the cell's function itself). Cached per cell, step, mode, shapes, dtype and device.
    """
    mode = mode or fused_mode()
    leaves, in_spec = tree_flatten(args)
    # Triton runs on CUDA tensors, or on CPU tensors under its interpreter (tests)
    if mode != "eager" and dispatch.is_lstm(cell) and dispatch.on_triton(leaves[0]) and cuda_pointwise() == "triton":
        from lmtrain.model.kernels.cuda import lstm_triton

        return getattr(lstm_triton, f"{which}_step")
    key = (cell.__name__, which, mode, tuple((tuple(t.shape), t.dtype) for t in leaves), leaves[0].device)
    fn = _STEP_CACHE.get(key)
    if fn is None:
        eager = getattr(cell, f"{which}_step")
        fn = eager if mode == "eager" else build_step(eager, args, mode, key)
        _STEP_CACHE[key] = fn
    return fn


def build_step(eager: Callable, args: tuple, mode: str, key: tuple) -> Callable:
    """Trace `eager` on `args` to a pure ATen graph, compile it (mode "compile"), and wrap it back
    into the step function's signature. Falls back to `eager` with a warning when that fails."""
    from torch.fx.experimental.proxy_tensor import make_fx

    leaves, in_spec = tree_flatten(args)
    # detached: which inputs require grad differs between the first step and the rest (the
    # caller's initial state), and the compiled graph would be guarded and rebuilt on that
    leaves = [t.detach() for t in leaves]
    out_spec = []

    def flat(*flat_args):
        outputs, spec = tree_flatten(eager(*tree_unflatten(list(flat_args), in_spec)))
        out_spec.append(spec)
        return outputs

    try:
        with torch.no_grad():
            graph = make_fx(torch.func.functionalize(flat, remove="mutations_and_views"))(*leaves)
        run = torch.compile(graph, fullgraph=True, dynamic=False) if mode == "compile" else graph
        with torch.no_grad():
            run(*leaves)  # compile now, so a failure falls back here and not mid-sequence
    except Exception as error:  # noqa: BLE001  any tracer or compiler failure: the eager step still works
        warnings.warn(f"lmtrain fused path: {key[0]} {key[1]} step could not be {mode}d ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); running it eagerly", RuntimeWarning, stacklevel=2)
        return eager
    spec = out_spec[0]

    def step(*step_args):
        return tree_unflatten(list(run(*(t.detach() for t in tree_flatten(step_args)[0]))), spec)

    return step


class FusedSequence(torch.autograd.Function):
    """outputs = FusedSequence.apply(cell, n_state, low, x, w_ih, w_hh, b_ih, b_hh, *state, *extra):
    the signature and results of lmtrain.model.recurrence.Recurrence.

    low: None or torch.bfloat16 (mixed precision's GEMM operands, lmtrain.model.kernels.mixed);
    x: (T, B, I); w_ih: (GH, I); w_hh: (GH, H); b_ih: (GH,); b_hh: (GH,) or None;
    state: n_state tensors (B, H); extra: the cell's per-unit parameters.
    outputs: y (T, B, H) followed by the n_state final state tensors (B, H).
    """

    @staticmethod
    def forward(ctx, cell: ModuleType, n_state: int, low, x: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh, *rest):
        state, extra = tuple(rest[:n_state]), tuple(rest[n_state:])
        steps, batch, inputs = x.shape
        width, hidden = w_hh.shape
        w_ih, w_hh = mixed.operand(w_ih, low), mixed.operand(w_hh, low)
        # (T, B, GH): the input projections of all steps in one GEMM, into a reused buffer
        xg = scratch("xg", (steps, batch, width), x)
        mixed.mm(mixed.operand(x.reshape(steps * batch, inputs), low), w_ih.t(), b_ih, out=xg.view(steps * batch, width))
        hg = scratch("hg", (batch, width), x)  # (B, GH): each step's recurrent GEMM lands here
        w_hh_t = w_hh.t()
        ys = x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T: the output and dW_hh's operand
        ys[0] = state[0]
        states, saved = [state], []
        step = None
        for t in range(steps):
            mixed.mm(mixed.operand(state[0], low), w_hh_t, b_hh, out=hg)
            if step is None:
                step = step_function(cell, "forward", (xg[t], hg, state, extra))
            state, step_saved = step(xg[t], hg, state, extra)
            ys[t + 1] = state[0]
            states.append(state)
            saved.append(step_saved)
        ctx.cell, ctx.has_b_hh, ctx.low = cell, b_hh is not None, low
        ctx.states, ctx.saved = states, saved  # per-step tuples: plain lists, not autograd inputs
        ctx.save_for_backward(x, w_ih, w_hh, ys, *extra)  # the weights as the products took them
        return (ys[1:].clone(), *(s.clone() for s in state))

    @staticmethod
    def backward(ctx, dy: Tensor, *d_final):
        x, w_ih, w_hh, ys, *extra = ctx.saved_tensors
        extra = tuple(extra)
        cell, low = ctx.cell, ctx.low
        steps, batch, inputs = x.shape
        width, hidden = w_hh.shape
        d_state = list(d_final)
        dxg = scratch("dxg", (steps, batch, width), ys)
        dhg = None  # dxg itself for cells whose two pre-activation gradients are one tensor
        # dh_{t-1} = d hg_t W_hh (+ the direct part) alternates between two (B, H) buffers, so a
        # step never writes the tensor it reads
        dh_buffers = (scratch("dh0", (batch, hidden), ys), scratch("dh1", (batch, hidden), ys))
        d_extra = [torch.zeros_like(e) for e in extra]
        step = None
        for t in reversed(range(steps)):
            d_state[0] = d_state[0] + dy[t]
            args = (tuple(d_state), ctx.saved[t], ctx.states[t], extra)
            if step is None:
                step = step_function(cell, "backward", args)
            dxg_t, dhg_t, d_prev, d_extra_t = step(*args)
            if dhg is None:
                shared = dhg_t is dxg_t or (dhg_t.data_ptr() == dxg_t.data_ptr() and dhg_t.stride() == dxg_t.stride())
                dhg = dxg if shared else scratch("dhg", (steps, batch, width), ys)
            dxg[t] = dxg_t
            if dhg is not dxg:
                dhg[t] = dhg_t
            d_state = list(d_prev)
            d_state[0] = mixed.mm(mixed.operand(dhg[t], low), w_hh, d_prev[0], out=dh_buffers[t % 2])
            for acc, d in zip(d_extra, d_extra_t):
                acc += d
        dx, dw_ih, dw_hh, db_ih, db_hh = mixed.sequence_grads(dxg, dhg, x, ys[:-1], w_ih, low, ctx.needs_input_grad[3])
        db_hh = db_hh if ctx.has_b_hh else None
        d_state[0] = d_state[0].clone()  # the returned gradient must not be a reused buffer
        return (None, None, None, dx, dw_ih, dw_hh, db_ih, db_hh, *d_state, *d_extra)


def run(cell: ModuleType, x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
        b_hh: Tensor | None = None, extra: tuple[Tensor, ...] = (), low: torch.dtype | None = None,
        persistent: bool = False) -> tuple[Tensor, tuple[Tensor, ...]]:
    """x (T, B, I), state -> y (T, B, H), the final state: run_layer's contract. `persistent`
    (dispatch's "persistent" path): the LSTM's whole time loop is one kernel launch each way
    (lmtrain.model.kernels.cuda.lstm_persistent)."""
    if persistent:
        from lmtrain.model.kernels.cuda import lstm_persistent

        return lstm_persistent.run(x, state, w_ih, w_hh, b_ih, low)
    outputs = FusedSequence.apply(cell, len(state), low, x, w_ih, w_hh, b_ih, b_hh, *state, *extra)
    return outputs[0], tuple(outputs[1:])
