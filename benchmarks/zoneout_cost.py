"""What zoneout costs a training step: a language model with a 2 × 200 lstm stack, without zoneout
(its C++ sequence loop), without zoneout on the generic engine (LMTRAIN_KERNELS=0: the path a
zoned layer runs on, so the two differences can be told apart), and with model.zoneout_hidden =
model.zoneout_cell = 0.1. One step is forward, loss, backward and an SGD update on a batch of
B streams × T tokens; the three run round-robin (lmtrain.tools.bench_timing), the median of the
repeats, in training tokens per second.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zoneout_cost.py [--vocab 10000] [--batch 20] [--bptt 35] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from lmtrain.config import ModelConfig
from lmtrain.model import LanguageModel
from lmtrain.tools.bench_timing import time_round_robin, with_env


def training_step(model: LanguageModel, tokens: torch.Tensor, batch: int):
    """One optimizer step of `model` on tokens (T + 1, B), as a callable."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        logits, _ = model(tokens[:-1], model.init_state(batch))
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.bptt + 1, args.batch))
    base = ModelConfig(layers=2, embedding_size=200, hidden_size=200)
    zoned = ModelConfig(layers=2, embedding_size=200, hidden_size=200, zoneout_hidden=0.1, zoneout_cell=0.1)

    def step(config: ModelConfig):
        return training_step(LanguageModel(config, args.vocab).train(), tokens, args.batch)

    runs = {"lstm": step(base), "lstm on the engine": with_env("LMTRAIN_KERNELS", "0", step(base)),
            "lstm, zoneout 0.1": step(zoned)}
    seconds = time_round_robin(runs, args.repeats, args.warmup, torch.device("cpu"))
    tokens_per_step = args.batch * args.bptt
    print(f"torch threads {torch.get_num_threads()}, vocab {args.vocab}, B {args.batch}, T {args.bptt}; "
          f"median of {args.repeats}, training tokens/s")
    for name, s in seconds.items():
        print(f"{name:>20} {tokens_per_step / s:10,.0f}   ({s * 1e3:.1f} ms a step, {seconds['lstm'] / s:.2f}x the lstm's speed)")


if __name__ == "__main__":
    main()
