"""Fast paths that check themselves, and fall back when they fail.

A fast path is only as good as the machine it first runs on: a kernel may fail to build, crash,
or give wrong numbers on hardware nobody tested it on. So the first time a fast path is chosen for
a kind of call in a process (its `key`: the path, cell, device, dtypes and sizes, not the window
length), `check` runs it once on the call's own tensors, cut to its first CHECK_STEPS steps,
against the plain-torch reference (the generic engine for a layer): outputs, final state and
the gradient of every input, within TOLERANCE for the dtype. A path that raises or disagrees
is turned off for the rest of the process, with one warning line naming it and why, and the
dispatcher picks the next path down; the last one, plain torch, runs wherever torch runs. A path
that raises later on, in a forward, is turned off the same way (lmtrain.model.recurrence).

The check reads no random numbers from torch's generators (its projections come from a
generator of its own), so a run's numbers are those of the path that runs: with a path that
fails its check, they equal those of a run with that path switched off from the start
(LMTRAIN_DISABLE). Switches (lmtrain.model.kernels.dispatch.SWITCHES):

    LMTRAIN_SELF_CHECK=0     no checks (benchmarks); a path that raises still falls back
    LMTRAIN_DISABLE=a,b      these paths off from the start
    LMTRAIN_FAULT=a,b:wrong  FOR TESTS ONLY: path a raises, path b returns wrong numbers, so that
                             tests on a CPU can show every path's failure is caught

The paths, by name (PATHS), are the layer paths of lmtrain.model.kernels.dispatch, the fused
cross-entropy, the generation stepper's whole-step op, CUDA-graph capture and the C++ build.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import cache

import torch
from torch import Tensor

from lmtrain.errors import LmtrainError, one_line
from lmtrain.model.kernels import dispatch

PATHS = {
    "persistent": "the LSTM's whole window in one Triton launch each way (CUDA)",
    "triton": "the fused loop with the LSTM's hand-written Triton step kernels",
    "fused": "the fused loop with each cell's steps compiled (every cell on CUDA)",
    "sequence": "the LSTM's own whole-sequence kernel (our C++ loops on the CPU)",
    "cross-entropy": "the fused cross-entropy (C++, CPU)",
    "step-op": "generation's whole step in one C++ op (CPU)",
    "cuda-graphs": "a training window captured once as a CUDA graph and replayed",
    "build": "building and loading our C++ ops",
}
FAULTS = ("raise", "wrong")
CHECK_STEPS = 3  # the steps of a window the check runs: every path's loop is the same at each step
# largest |fast - reference| allowed, relative to the reference's largest magnitude, by the
# lowest precision in the arithmetic (bfloat16: its 8-bit mantissa, over a few steps)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2}
PROJECTION_SEED = 20170  # the check's own generator: the run's random numbers are left alone

_off: dict[str, str] = {}  # path -> why it was turned off in this process
_passed: set[tuple] = set()  # (path, key) whose check passed


class InjectedFault(RuntimeError):
    """What LMTRAIN_FAULT makes a path raise."""


def names(switch: str) -> dict[str, str]:
    """A list switch ("a,b:wrong") -> {path: fault}; an unknown path or fault is one error line.
    Read at every call (tests set them), parsed once per value: every layer call asks."""
    return parsed_names(switch, dispatch.switch(switch))


@cache
def parsed_names(switch: str, value: str) -> dict[str, str]:
    parsed = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        path, _, fault = item.partition(":")
        if path not in PATHS:
            raise LmtrainError(f"{switch}: unknown path '{path}' (known: {', '.join(PATHS)})")
        if fault and fault not in FAULTS:
            raise LmtrainError(f"{switch}: a fault is {' or '.join(FAULTS)}, got '{fault}' for {path}")
        parsed[path] = fault or "raise"
    return parsed


def check_switches() -> None:
    """Every kernel switch set to a value it takes (LmtrainError naming the first that is not):
    read at a command's start, so a mistyped one is a usage error before any work."""
    for name, (_, choices, _) in dispatch.SWITCHES.items():
        if choices is not None:
            dispatch.switch(name)
    names("LMTRAIN_DISABLE")
    names("LMTRAIN_FAULT")


def is_off(path: str) -> bool:
    return path in _off or path in names("LMTRAIN_DISABLE")


def turned_off() -> dict[str, str]:
    """The paths turned off in this process so far, and why (for lmtrain doctor)."""
    return {**{path: "LMTRAIN_DISABLE" for path in names("LMTRAIN_DISABLE")}, **_off}


def failures() -> dict[str, str]:
    """The paths that failed (a check, or later on) in this process, and why."""
    return dict(_off)


def passed() -> set[str]:
    """The paths that passed a check in this process (for lmtrain doctor)."""
    return {path for path, _ in _passed}


def raised(error: Exception) -> str:
    """Why a path failed when it raised `error`, in the words of the warning line."""
    return f"it raised {type(error).__name__}: {one_line(str(error), 160) or 'no message'}"


def turn_off(path: str, why: str, instead: Callable[[], str] | None = None) -> None:
    """Turn `path` off for this process, with one warning line (the first time) naming it, why,
    and what runs instead (`instead()`, asked once the path is off)."""
    if path not in _off:
        _off[path] = why
        other = f"; {instead()} runs instead" if instead is not None else ""
        print(f"warning: lmtrain's {path} path is off for this process: {why}{other}", file=sys.stderr, flush=True)


def reset() -> None:
    """Forget what was checked and turned off (tests)."""
    _off.clear()
    _passed.clear()


def inject(path: str) -> None:
    """Raise here when LMTRAIN_FAULT says `path` raises (tests)."""
    if names("LMTRAIN_FAULT").get(path) == "raise":
        raise InjectedFault(f"fault injected into the {path} path (LMTRAIN_FAULT)")


def distort(path: str, outputs: Sequence[Tensor]) -> list[Tensor]:
    """`outputs`, their first one off by 0.5 when LMTRAIN_FAULT says `path` is wrong (tests)."""
    outputs = list(outputs)
    if names("LMTRAIN_FAULT").get(path) == "wrong":
        outputs[0] = outputs[0] + 0.5
    return outputs


def tolerance(*dtypes: torch.dtype | None) -> float:
    return max(TOLERANCE.get(d, TOLERANCE[torch.float32]) for d in dtypes if d is not None)


def pending(path: str, key: tuple) -> bool:
    """Whether `path` is still to be checked for calls of kind `key`: checks on, not checked
    before, and not inside a CUDA graph capture. Cheap: every call asks before it builds a check."""
    return (path, key) not in _passed and dispatch.on("LMTRAIN_SELF_CHECK") and not capturing()


def check(path: str, key: tuple, fast: Callable[..., Sequence[Tensor]], reference: Callable[..., Sequence[Tensor]],
          inputs: Sequence[Tensor], tol: float) -> str | None:
    """Why `fast` disagrees with `reference` on `inputs` (both: tensors -> a sequence of tensors),
    or None when it agrees, was checked before for `key`, or checks are off. An error that is
    not the path's (out of memory, a user error, an interrupt) propagates."""
    if not pending(path, key):
        return None
    try:
        got = outputs_and_grads(fast, inputs)
    except (torch.OutOfMemoryError, LmtrainError):
        raise
    except Exception as error:  # noqa: BLE001  whatever the kernel raised, unless the reference raises too
        try:
            outputs_and_grads(reference, inputs)
        except Exception:  # noqa: BLE001  both refuse the call: the input is at fault, not the path
            raise error from None
        return raised(error)
    try:
        want = outputs_and_grads(reference, inputs)
    except (torch.OutOfMemoryError, LmtrainError):
        raise
    except Exception:  # noqa: BLE001  only the reference cannot run this call: nothing to hold the path to
        _passed.add((path, key))
        return None
    for (what, a), (_, b) in zip(got, want, strict=True):
        problem = disagreement(a, b, tol)
        if problem:
            return f"its {what} {problem}"
    _passed.add((path, key))
    return None


def capturing() -> bool:
    """Inside a CUDA graph capture nothing may run but the captured work."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def outputs_and_grads(fn: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor]) -> list[tuple[str, Tensor | None]]:
    """fn's outputs on fresh leaves of `inputs` (sharing their memory: no path writes to its
    inputs), then the gradients of a fixed random projection of all of them with respect to every
    floating-point input: [(what, tensor or None)]."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.enable_grad():
        outputs = list(fn(*leaves))
        found = [(f"output {i}", out.detach()) for i, out in enumerate(outputs)]
        differentiable = [out for out in outputs if out.requires_grad]
        wrt = [leaf for leaf in leaves if leaf.requires_grad]
        if differentiable and wrt:
            generator = torch.Generator().manual_seed(PROJECTION_SEED)
            loss = sum((out.double() * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)).sum()
                       for out in differentiable)
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            at = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            found += [(f"gradient of input {i}", None if g is None else g.detach()) for i, g in zip(at, grads)]
    return found


def disagreement(a: Tensor | None, b: Tensor | None, tol: float) -> str | None:
    """How a differs from b beyond `tol` (relative to b's largest magnitude), or None."""
    if a is None or b is None:
        return None if a is None and b is None else "is missing" if a is None else "is there where the reference has none"
    if a.shape != b.shape:
        return f"has shape {tuple(a.shape)}, the reference {tuple(b.shape)}"
    if not b.numel():
        return None
    wide = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)  # on their device
    a, b = a.to(wide), b.to(wide)
    scale, error, finite_a, finite_b = torch.stack([b.abs().max(), (a - b).abs().max(), torch.isfinite(a).all().to(wide),
                                                    torch.isfinite(b).all().to(wide)]).tolist()
    if not finite_b:  # the reference's own numbers overflowed: nothing to hold the path to
        return None
    if not finite_a:
        return "is not finite"
    if error > tol * max(scale, 1e-6):
        return f"differs from the reference by {error:.3g} (largest value {scale:.3g}, tolerance {tol:g} of it)"
    return None
