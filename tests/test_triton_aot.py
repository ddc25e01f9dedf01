"""Every @triton.jit kernel of lmtrain compiled ahead of time for real GPU targets (sm_80, sm_90),
on a machine without a GPU: Triton ships its own ptxas, so the whole pipeline down to the cubin runs
here. This catches what the interpreter (TRITON_INTERPRET=1, the other Triton tests) cannot: the
interpreter runs the kernel's Python, while the compiler type-checks every branch of it, dead ones
included (a `return` inside a constexpr `if` does not stop it: the bf16 `_dot` failure).

The compile runs in a child process: TRITON_INTERPRET is read when a module's kernels are defined,
and other tests import the kernels under the interpreter; the child imports them afresh without it,
with a Triton cache of its own, so nothing is reused across runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' brings it)")

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sm80": 80, "sm90": 90}
F32, BF16, F64 = "*fp32", "*bf16", "*fp64"


def persistent_forward(low: int) -> dict:
    """lstm_persistent.PersistentLSTM.forward's launch: xg from mixed.mm (float32 sums), w_hh_t the
    weight as mixed.operand gives it (bfloat16 on CUDA with LOW 1, float32 holding bfloat16 values
    with LOW 2), the rest float32 buffers."""
    weight = BF16 if low == 1 else F32
    return {"xg": F32, "w_hh_t": weight, "hs": F32, "cs": F32, "acts": F32, "tanh_cs": F32,
            "steps": "i32", "batch": "i32", "hidden": "i32"}


def persistent_backward(low: int) -> dict:
    """lstm_persistent.PersistentLSTM.backward's launch: the saved float32 activations, dy, and w_hh
    as the forward's products took it."""
    weight = BF16 if low == 1 else F32
    return {"acts": F32, "cs": F32, "tanh_cs": F32, "dy": F32, "w_hh": weight, "dgates": F32, "dh": F32, "dc": F32,
            "steps": "i32", "batch": "i32", "hidden": "i32"}


def pointwise_forward(pointer: str) -> dict:
    """lstm_triton.forward_step's launch: xg[t], hg, c and the new tensors, all of the state's dtype
    (float32 in training, float64 in the CPU tests; compute_type picks COMPUTE from it)."""
    names = ("xg", "hg", "c", "acts", "c_new", "tanh_c", "h_new")
    return {**{n: pointer for n in names}, **{n: "i32" for n in ("n", "hidden", "xg_row", "hg_row", "c_row")}}


def pointwise_backward(pointer: str) -> dict:
    """lstm_triton.backward_step's launch, dtypes as for the forward."""
    names = ("dh", "dc", "acts", "tanh_c", "c_prev", "dgates", "dc_prev")
    return {**{n: pointer for n in names}, **{n: "i32" for n in ("n", "hidden", "dh_row", "dc_row", "c_row")}}


def kernels() -> dict[str, tuple[str, str, dict, dict]]:
    """name -> (module, kernel, signature without constexprs, constexprs) for every launch the code
    makes. Constexprs are given by name here and filled in the child (tl dtypes, the block sizes the
    modules define)."""
    table = {}
    for low in (0, 1, 2):
        blocks = {"LOW": low, "BLOCK_B": "BLOCK_B", "BLOCK_N": "BLOCK_N", "BLOCK_K": "BLOCK_K"}
        table[f"persistent_forward_low{low}"] = ("lstm_persistent", "forward_kernel", persistent_forward(low), blocks)
        table[f"persistent_backward_low{low}"] = ("lstm_persistent", "backward_kernel", persistent_backward(low), blocks)
    for pointer, compute in ((F32, "float32"), (F64, "float64")):
        consts = {"COMPUTE": compute, "BLOCK": "BLOCK"}
        table[f"pointwise_forward_{compute}"] = ("lstm_triton", "forward_kernel", pointwise_forward(pointer), consts)
        table[f"pointwise_backward_{compute}"] = ("lstm_triton", "backward_kernel", pointwise_backward(pointer), consts)
    return table


def compile_all(arch: int) -> dict[str, str | None]:
    """In the child: compile every kernel of `kernels()` for cuda sm_`arch` -> name -> None or the error."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    modules = {name: importlib.import_module(f"lmtrain.model.kernels.cuda.{name}") for name in ("lstm_triton", "lstm_persistent")}
    results = {}
    for name, (module_name, kernel_name, signature, consts) in kernels().items():
        module = modules[module_name]
        kernel = getattr(module, kernel_name)
        constexprs = {k: getattr(tl, v) if k == "COMPUTE" else getattr(module, v) if isinstance(v, str) else v
                      for k, v in consts.items()}
        full = {**signature, **{k: "constexpr" for k in consts}}
        if list(full) != list(kernel.arg_names):  # a changed kernel signature must change this table too
            results[name] = f"signature mismatch: kernel takes {kernel.arg_names}, the test gives {list(full)}"
            continue
        try:
            source = ASTSource(fn=kernel, signature=full, constexprs=constexprs)
            triton.compile(source, target=GPUTarget("cuda", arch, 32))
            results[name] = None
        except Exception as error:  # noqa: BLE001  reported per kernel by the test
            causes, cause = [], error.__cause__
            while cause is not None:  # the CompilationError shows where; its cause says what
                causes.append(f"{type(cause).__name__}: {cause}")
                cause = cause.__cause__
            results[name] = "\n".join([f"{type(error).__name__}: {error}", *causes])
    return results


@pytest.fixture(scope="module", params=list(TARGETS))
def compiled(request, tmp_path_factory):
    """(target name, name -> None or the compile error) for one target, from one child process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp(f"triton-cache-{request.param}"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default the launches get; silences Triton 3.9's notice
    child = subprocess.run([sys.executable, __file__, str(TARGETS[request.param])], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]
    return request.param, json.loads(child.stdout.splitlines()[-1])


@pytest.mark.parametrize("kernel", list(kernels()))
def test_kernel_compiles_for_the_gpu(compiled, kernel):
    target, results = compiled
    assert results[kernel] is None, f"{kernel} does not compile for {target}:\n{results[kernel]}"


def test_the_table_names_every_jit_kernel():
    """Every @triton.jit kernel in lmtrain that is launched (not a `_helper` it calls) is in
    `kernels()`, so a new kernel cannot slip past this check."""
    found = set()
    for path in (ROOT / "lmtrain").rglob("*.py"):
        lines = path.read_text().splitlines()
        for at, line in enumerate(lines[:-1]):
            if line.strip().startswith("@triton.jit") and not lines[at + 1].startswith("def _"):
                found.add((path.stem, lines[at + 1].removeprefix("def ").split("(")[0]))
    assert found == {(module, kernel) for module, kernel, _, _ in kernels().values()}


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]))))
