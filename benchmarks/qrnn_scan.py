"""The QRNN's forward recurrence c_t = f_t ⊙ c_{t-1} + g_t over one window, two ways: the loop our
fast path runs (one addcmul per step, lmtrain/model/cells/qrnn.py) and a Hillis-Steele parallel scan
(log2 T passes, each over the whole window). Interleaved rounds, median of the repeats; both are
checked to give the same cells first.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/qrnn_scan.py [--sizes 200,650] [--bptt 35] [--batch 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor


def loop(f: Tensor, g: Tensor, c0: Tensor) -> Tensor:
    """c (T + 1, B, H), c[0] = c0, c[t + 1] = f[t] ⊙ c[t] + g[t]: as QRNNWindow's forward."""
    c = torch.empty(f.size(0) + 1, *c0.shape, dtype=c0.dtype)
    c[0] = c0
    for t in range(f.size(0)):
        torch.addcmul(g[t], f[t], c[t], out=c[t + 1])
    return c


def scan(f: Tensor, g: Tensor, c0: Tensor) -> Tensor:
    """The same cells by an inclusive scan of the affine maps c -> f c + g: after the pass with
    offset k, step t holds the composition of steps t-2k+1 .. t."""
    a, b = f.clone(), g.clone()
    b[0] = torch.addcmul(b[0], a[0], c0)  # fold the initial cell into the first map
    k = 1
    while k < f.size(0):
        b_new = torch.addcmul(b[k:], a[k:], b[:-k])
        a[k:] = a[k:] * a[:-k]
        b[k:] = b_new
        k *= 2
    return torch.cat([c0[None], b])


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,650")
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=20, help="calls per timing")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, T = {args.bptt}, B = {args.batch}; median of {args.repeats}, µs per window")
    print(f"{'H':>6} {'loop':>10} {'scan':>10} {'scan/loop':>10}")
    for hidden in (int(s) for s in args.sizes.split(",")):
        torch.manual_seed(0)
        f = torch.rand(args.bptt, args.batch, hidden)
        g = torch.randn(args.bptt, args.batch, hidden) * 0.1
        c0 = torch.randn(args.batch, hidden)
        assert torch.allclose(loop(f, g, c0), scan(f, g, c0), atol=1e-5)
        timings = {"loop": [], "scan": []}
        for _ in range(args.repeats):  # interleaved: each repeat times both
            for name, fn in (("loop", loop), ("scan", scan)):
                timings[name].append(median_us(lambda: [fn(f, g, c0) for _ in range(args.rounds)], 1) / args.rounds)
        lo, sc = statistics.median(timings["loop"]), statistics.median(timings["scan"])
        print(f"{hidden:>6} {lo:>10.0f} {sc:>10.0f} {sc / lo:>10.2f}")


if __name__ == "__main__":
    main()
