"""Our C++ CPU ops (torch.ops.lmtrain), built on first use by torch's extension loader.

    cpu/lstm_cpu.cpp           the LSTM's time loops and the panel GEMM's ops (lmtrain.model.kernels.lstm)
    cpu/cross_entropy_cpu.cpp  the fused cross-entropy (lmtrain.model.kernels.cross_entropy)
    cpu/cell_cpu.cpp           every other cell's time loops (lmtrain.model.kernels.cell_sequence), over
                               step functors generated from the cells' equations (cell_steps.h)
    cpu/step_cpu.cpp           one generation step (lmtrain.generation.stepper): its products
                               (step_products.h), its pointwise step and draw (step_sampling.h), and
                               the whole step of a stack of any cells in one op

The build is cached per machine under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions)
as `lmtrain_cpu_<key>`, where the key (`build_key`) hashes everything the library depends on: the
bytes of every source and header, the compiler flags, the torch version and the CPU's
instruction-set features (the flags say -march=native). torch's loader, left to itself, decides
rebuilds by file times, so a source replaced by an older one kept a stale library; and a cache
shared by hosts of different CPUs would load code the CPU cannot run. With the key in the name,
a change of any input is a different directory, built afresh.

One lmtrain process builds a key at a time (an flock beside the build, released by the kernel
when its holder dies); the others wait with one line on stderr. A library that is damaged (cut
short, or refused by the loader) is removed and built again once. Without a compiler or ninja,
or with LMTRAIN_COMPILE=0, `cpu_ops()` is None and every caller runs its Python version of the
same computation.
"""

from __future__ import annotations

import hashlib
import os
import platform
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

from lmtrain.locks import exclusive
from lmtrain.model.kernels import dispatch

EXTENSION = "lmtrain_cpu"
SOURCES = ("lstm_cpu.cpp", "cell_cpu.cpp", "cross_entropy_cpu.cpp", "step_cpu.cpp")
GENERATED = "cell_steps.h"  # written at build time (generated_headers)
HEADERS = ("fast_math.h", "panel_gemm.h", "recurrent_gemm.h", "step_products.h", "step_sampling.h")
# -fopenmp: at::parallel_for runs on torch's OpenMP threads only when compiled with it
CFLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def note(message: str) -> None:
    """One line on stderr (looked up at call time, so the CLI's and the tests' captures see it)."""
    print(message, file=sys.stderr, flush=True)


def build_key(files: dict[str, bytes], flags: list[str], torch_version: str, cpu_features: str) -> str:
    """The build's identity: a pure function of the bytes of every source and header (by name),
    the compiler and linker flags, the torch version and the CPU's instruction-set features."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"file {name} {len(files[name])}\0".encode())
        h.update(files[name])
    for part in (*flags, "torch", torch_version, "cpu", cpu_features):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cpu_features() -> str:
    """The CPU's instruction-set features: the `flags` (x86) or `Features` (Arm) line of
    /proc/cpuinfo, with the machine's architecture; the processor's name where there is no such file."""
    machine = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return f"{machine}: {' '.join(sorted(value.split()))}"
    except OSError:
        pass
    return f"{machine}: {platform.processor()}"


def generated_headers() -> dict[str, bytes]:
    """The headers generated for the build: cell_steps.h, every cell's step functor from its
    equations (lmtrain.model.kernels.emit_cpp). Written into the build directory, and part of
    the key, so a changed equation is a different build."""
    from lmtrain.model.kernels.cell_sequence import generated_programs
    from lmtrain.model.kernels.emit_cpp import header

    return {GENERATED: header(generated_programs()).encode()}


def current_key(here: Path) -> str:
    files = {name: (here / name).read_bytes() for name in SOURCES + HEADERS} | generated_headers()
    flags = [*CFLAGS, "ldflags", *LDFLAGS, "cxx", os.environ.get("CXX", "c++")]
    return build_key(files, flags, torch.__version__, cpu_features())


def build_directory() -> Path:
    """Where this machine's build of the current sources lives (torch's extension cache,
    TORCH_EXTENSIONS_DIR when set), one directory per build key."""
    from torch.utils import cpp_extension

    name = f"{EXTENSION}_{current_key(Path(__file__).parent / 'cpu')}"
    return Path(cpp_extension._get_build_directory(name, False))


@cache
def _load_cpu_ops():
    """Build (once per machine and key) and load our C++ ops; None, with a warning, when that fails."""
    try:
        from torch.utils import cpp_extension

        from lmtrain.model.kernels import selfcheck

        selfcheck.inject("build")
        here = Path(__file__).parent / "cpu"
        name = f"{EXTENSION}_{current_key(here)}"
        build_dir = build_directory()
        build_dir.mkdir(parents=True, exist_ok=True)

        generated = build_dir / "generated"

        def load():
            write_generated(generated)
            # the ops register under the `lmtrain` namespace (TORCH_LIBRARY in lstm_cpu.cpp), whatever the library's name
            cpp_extension.load(name=name, sources=[str(here / s) for s in SOURCES], extra_cflags=list(CFLAGS),
                               extra_ldflags=list(LDFLAGS), extra_include_paths=[str(generated)],
                               build_directory=str(build_dir), is_python_module=False, verbose=False)

        def forget():  # torch's loader skips the build step for a name it already built in this process
            getattr(cpp_extension, "JIT_EXTENSION_VERSIONER").entries.pop(name, None)

        with holding_build_lock(build_dir):
            load_rebuilding_once(load, build_dir / f"{name}.so", forget)
        return torch.ops.lmtrain
    except Exception as e:  # no compiler, no ninja, a failed build: the Python loops still work
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        warnings.warn(f"lmtrain: compiled kernels unavailable, using the Python code ({reason})", stacklevel=3)
        return None


def write_generated(directory: Path) -> None:
    """The generated headers into `directory` (under the build lock), each replaced whole, and
    left alone when already the same (so the build tool sees nothing new)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in generated_headers().items():
        path = directory / name
        if not path.exists() or path.read_bytes() != text:
            partial = path.with_suffix(".partial")
            partial.write_bytes(text)
            partial.replace(path)


@contextmanager
def holding_build_lock(build_dir: Path, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the build directory's lmtrain lock while the block builds and loads; while another
    lmtrain process holds it, say one line on stderr and wait for it.

    torch's loader waits without limit while its own `lock` file exists, and a build killed
    outright leaves that file behind. Under our lock no other lmtrain process is building this
    key (a dead holder has lost its flock), so a torch lock file found then is such a leftover,
    and is removed."""
    tell = say or note
    with exclusive(build_dir / "lmtrain.lock", f"the C++ kernels' build in {build_dir}",
                   wait=lambda line: tell(f"note: {line}; a build takes about a minute")):
        (build_dir / "lock").unlink(missing_ok=True)
        yield


def load_rebuilding_once(load: Callable[[], None], library: Path, forget: Callable[[], None],
                         say: Callable[[str], None] | None = None) -> None:
    """`load()` the built library; a damaged one (cut short, or refused by the dynamic loader)
    is removed, with one line on stderr, and built and loaded again, once."""
    problem = damage(library)
    if problem is None:
        try:
            load()
            return
        except OSError as e:  # dlopen's refusal ("invalid ELF header", "file too short")
            if not library.exists():
                raise
            problem = (e.strerror or str(e)).strip().splitlines()[0][:160]
    (say or note)(f"warning: the compiled kernels {library} are damaged ({problem}); building them again")
    library.unlink(missing_ok=True)
    forget()
    load()


def damage(library: Path) -> str | None:
    """Why the ELF shared library `library` cannot be whole (cut short, not ELF), or None when it
    looks whole or is not there yet. Checked before loading: mapping a file cut short can kill the
    process (SIGBUS) where a refusal would only raise."""
    try:
        with open(library, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 64:
                return f"cut short at {size} bytes"
            if head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
                return "not a 64-bit ELF file"
            endian = "<" if head[5] == 1 else ">"
            phoff, shoff = struct.unpack_from(endian + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(endian + "HHHH", head, 54)
            if phoff + phentsize * phnum > size or shoff + shentsize * shnum > size:
                return f"cut short at {size} bytes"
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e.strerror
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(endian + "IIQQQQ", table, i * phentsize)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD: mapped from the file
            return f"cut short at {size} bytes"
    return None


def cpu_ops():
    """The compiled loops (torch.ops.lmtrain), or None when off (LMTRAIN_COMPILE=0) or unbuildable."""
    if not dispatch.on("LMTRAIN_COMPILE"):
        return None
    return _load_cpu_ops()
