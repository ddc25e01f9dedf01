"""What a fast path's self-check costs (lmtrain.model.kernels.selfcheck): the check alone, timed
with a fresh process state each time (its compiles and buffers warm), at the reproductions' layer
sizes, on this machine's CPU.

    .venv/bin/python benchmarks/selfcheck_cost.py [--repeats 5]

Prints one line per size: the median milliseconds of one check (the path and the engine over
CHECK_STEPS steps, forward and backward) beside one full window's forward + backward."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmtrain.model import get_cell, selfcheck
from lmtrain.model.recurrence import checked_choice, run_layer

SIZES = [(200, 20, 35), (650, 20, 35), (1500, 20, 35)]  # hidden, batch, bptt: ptb-small, medium, large


def inputs(hidden: int, batch: int, steps: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, hidden, generator=g)
    state = (torch.zeros(batch, hidden), torch.zeros(batch, hidden))
    w_ih, w_hh = (torch.randn(4 * hidden, hidden, generator=g) * 0.05 for _ in range(2))
    return x, state, w_ih, w_hh, torch.zeros(4 * hidden)


def ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lstm = get_cell("lstm")
    print(f"torch threads {torch.get_num_threads()}; the LSTM's sequence kernel checked against the engine")
    for hidden, batch, steps in SIZES:
        x, state, w_ih, w_hh, b = inputs(hidden, batch, steps)
        leaves = [t.requires_grad_() for t in (x, w_ih, w_hh, b)]

        def check():
            selfcheck.reset()
            assert checked_choice(lstm, (x, state, w_ih, w_hh, b, None, ()), None).path == "sequence"

        def window():
            y, _ = run_layer(lstm, x, state, w_ih, w_hh, b)
            y.sum().backward()

        check(), window()  # warm: the C++ ops loaded, buffers allocated
        cost, full = ms(check, args.repeats), ms(window, args.repeats)
        print(f"hidden {hidden:5} batch {batch} bptt {steps}: check {cost:7.1f} ms, one window fwd+bwd {full:7.1f} ms")
        for leaf in leaves:
            leaf.grad = None


if __name__ == "__main__":
    main()
