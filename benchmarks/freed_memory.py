"""What keeping freed memory (lmtrain.runtime.keep_freed_memory, which the `lmtrain` command
calls) is worth: each measurement in two fresh processes, one with glibc's default allocator and
one with freed blocks kept, the pairs in turn, median of the repeats.

    fresh tensor  a V x 700 float32 tensor made and filled (the size of a window's logits at
                  bptt 35, batch 20), ms
    ce backward   the fused cross-entropy's backward on 700 x V logits, ms
    our loop      lmtrain's training loop on CORPUS at the PyTorch example's configuration
                  (lmtrain.tools.bench_loop), tokens/s over --steps steps after --warmup-steps

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/freed_memory.py [--corpus ../shared/data/ptb] [--vocab 10000,33278] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import sys, tempfile
from pathlib import Path
import torch
from lmtrain.runtime import keep_freed_memory
from lmtrain.tools.bench_timing import time_round_robin
what, keep, arg = sys.argv[1], sys.argv[2] == "kept", sys.argv[3]
if keep:
    assert keep_freed_memory()

def median_ms(f):
    return time_round_robin({"one": f}, 15, 3, torch.device("cpu"))["one"] * 1000

if what == "fresh tensor":
    print(median_ms(lambda: torch.ones(700, int(arg))))
elif what == "ce backward":
    from lmtrain.model.kernels.build import cpu_ops
    ops, logits = cpu_ops(), torch.randn(700, int(arg))
    targets = torch.randint(0, int(arg), (700,))
    _, lse = ops.cross_entropy_forward(logits, targets)
    grad = torch.full((700,), 1 / 700)
    print(median_ms(lambda: ops.cross_entropy_backward(logits, targets, lse, grad)))
else:
    from lmtrain.tools import bench_loop
    corpus, steps, warmup, precision = arg.split(",")
    times, _ = bench_loop.our_loop(Path(corpus), [*bench_loop.LOOP_SETTINGS, f"train.precision={precision}"],
                                   Path(tempfile.mkdtemp()), int(steps) + int(warmup))
    print(bench_loop.rate(times, int(warmup), 700))
"""


def measure(what: str, arg: str, repeats: int) -> dict[str, float]:
    values = {"default": [], "kept": []}
    for _ in range(repeats):
        for how in values:
            done = subprocess.run([sys.executable, "-c", CHILD, what, how, arg], capture_output=True, text=True, check=True)
            values[how].append(float(done.stdout.strip().splitlines()[-1]))
    return {how: statistics.median(v) for how, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=None, help="a corpus folder for the loop rows (none: no loop rows)")
    parser.add_argument("--vocab", default="10000,33278")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [(what, v) for v in args.vocab.split(",") for what in ("fresh tensor", "ce backward")]
    if args.corpus:
        rows += [("our loop", f"{args.corpus},{args.steps},{args.warmup_steps},{p}") for p in ("fp32", "bf16")]
    print("| measurement | setting | default | freed memory kept |\n|---|---|---:|---:|")
    for what, arg in rows:
        m = measure(what, arg, args.repeats)
        unit = "tokens/s" if what == "our loop" else "ms"
        setting = arg.split(",")[-1] if what == "our loop" else f"V = {arg}"
        print(f"| {what} ({unit}) | {setting} | {m['default']:,.1f} | {m['kept']:,.1f} |", flush=True)
        print(json.dumps({"what": what, "setting": setting, "unit": unit, **m}), file=sys.stderr)


if __name__ == "__main__":
    main()
