"""Each step's pointwise work fused into one kernel, for the one engine
(lmtrain.model.recurrence.Recurrence, given CompiledSteps(cell)): the path every cell takes on
CUDA (and on the CPU when forced, for tests). The engine's loop is the same on every path:

  - the cell's own `forward_step` and `backward_step` (lmtrain/model/cells/) are traced to ATen graphs
    (make_fx; functionalize turns their in-place and `out=` writes into pure ops) and compiled by
    `torch.compile` (inductor: Triton kernels on CUDA, C++ on the CPU), once per cell, step
    function, shapes, dtype and device, with fullgraph=True and dynamic=False, and cached;
    for the LSTM on CUDA, hand-written Triton kernels can stand in (LMTRAIN_CUDA_POINTWISE=triton,
    lmtrain/model/kernels/cuda/lstm_triton.py);
  - every recurrent GEMM writes into a reused buffer (cuBLAS on CUDA; `scratch`: one per name and
    trailing shape, sized for the longest window seen):
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

from lmtrain.model.kernels import dispatch

# (cell, "forward" | "backward", mode, leaf shapes, dtypes, device) -> a callable with the step
# function's signature. An explicit module-level cache: compiling costs seconds, a call microseconds.
_STEP_CACHE: dict[tuple, Callable] = {}
# (name, trailing shape, dtype, device) -> a scratch tensor that holds nothing between calls (see scratch())
_SCRATCH: dict[tuple, Tensor] = {}


def fused_mode() -> str:
    return dispatch.switch("LMTRAIN_FUSED_MODE")


def cuda_pointwise() -> str:
    return dispatch.switch("LMTRAIN_CUDA_POINTWISE")


def scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A (shape) buffer: the leading rows of one kept per (name, shape[1:], dtype, device), which
    grows to the largest shape[0] asked for and is reused by every later call.

    Only for values that are dead when the autograd function returns (the per-step GEMM outputs,
    the input projections, the gradients of the pre-activations): layers of the same shape share
    them, one after the other, which is safe because each call finishes with them before the next
    starts (same stream on CUDA). Keyed without the leading size, so that windows of many lengths
    (variable BPTT, each epoch's remainder) hold one buffer, not one each. The slice buf[:n] of a
    contiguous buffer is contiguous.

    A larger request replaces the buffer; a CUDA graph captured over the old one must keep it
    alive itself (`held_scratch`), as replays still write to its addresses.
    """
    key = (name, tuple(shape[1:]), like.dtype, like.device)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.size(0) < shape[0]:
        buffer = _SCRATCH[key] = like.new_empty(shape)
    return buffer[: shape[0]]


def held_scratch() -> list[Tensor]:
    """The scratch buffers held now: what a CUDA graph captured now reads and writes, which it keeps
    referenced for as long as it may be replayed (lmtrain.training.graphs)."""
    return list(_SCRATCH.values())


def clear_caches() -> None:
    """Forget compiled steps and scratch buffers (tests; freeing GPU memory)."""
    _STEP_CACHE.clear()
    _SCRATCH.clear()


def step_function(cell: ModuleType, which: str, args: tuple, mode: str | None = None, triton: bool | None = None) -> Callable:
    """The cell's `which` ("forward" or "backward") step as one fused function, for args like `args`.

    mode: compile (traced, then inductor), traced (the functionalized ATen graph, run as it is),
    eager (the cell's function itself). Cached per cell, step, mode, shapes, dtype and device.
    triton: the LSTM's Triton kernels instead (None: as the switches say, dispatch.triton_steps).
    """
    mode = mode or fused_mode()
    leaves, in_spec = tree_flatten(args)
    # Triton runs on CUDA tensors, or on CPU tensors under its interpreter (tests)
    if triton or (triton is None and dispatch.triton_steps(dispatch.cell_name(cell), leaves[0])):
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
    broken = False  # a compiled call failed (below): the eager step from then on

    def step(*step_args):
        nonlocal broken
        if broken:
            return eager(*step_args)
        try:
            return tree_unflatten(list(run(*(t.detach() for t in tree_flatten(step_args)[0]))), spec)
        except (torch.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001  e.g. dynamo's recompile limit under fullgraph: never mid-run
            warnings.warn(f"lmtrain fused path: the compiled {key[0]} {key[1]} step failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); running it eagerly from now on",
                          RuntimeWarning, stacklevel=2)
            broken = True
            _STEP_CACHE[key] = eager
            return eager(*step_args)

    return step


class CompiledSteps:
    """A cell whose per-step functions the engine (lmtrain.model.recurrence.Recurrence) takes
    compiled: `resolve(which, args)` gives the step function for those arguments' shapes
    (`step_function`), looked up once per sequence."""

    def __init__(self, cell: ModuleType, triton: bool = False):
        self.cell, self.triton = cell, triton

    def resolve(self, which: str, args: tuple) -> Callable:
        return step_function(self.cell, which, args, triton=self.triton)
