"""Generation speed per multiply-add, every cell: a random 2 x 650 model of each, vocabulary 10,000,
one stream, the stepper's step (lmtrain.generation.stepper: the whole-step op, and op by op beside
it), fp32 and int8 weights, interleaved rounds, median of 7 (docs/speed.md).

    .venv/bin/python benchmarks/generate_cells.py [CELLS] [PRECISIONS]     e.g. gru,lstm fp32,int8

"per MAC vs lstm" is tokens/s times the model's multiply-adds per token, over the LSTM's (one op,
same precision): 1.00 means the cell samples as fast per multiply-add as the LSTM."""

from __future__ import annotations

import statistics
import sys
import time

import torch

from lmtrain.config import ModelConfig
from lmtrain.generation.stepper import Stepper
from lmtrain.model import LanguageModel

HIDDEN, VOCAB, TOKENS, ROUNDS = 650, 10_000, 200, 7


def tokens_per_second(stepper: Stepper, model: LanguageModel) -> float:
    state, token = model.init_state(1), torch.tensor([1])
    with torch.no_grad():
        for _ in range(10):
            _, state = stepper.step(token, state)
        start = time.perf_counter()
        for _ in range(TOKENS):
            _, state = stepper.step(token, state)
    return TOKENS / (time.perf_counter() - start)


def main(cells: list[str], precisions: list[str]) -> None:
    torch.manual_seed(0)
    runs = {}
    for cell in ["lstm"] + [c for c in cells if c != "lstm"]:
        model = LanguageModel(ModelConfig(cell=cell, layers=2, embedding_size=HIDDEN, hidden_size=HIDDEN), VOCAB).eval()
        macs = sum(layer.w_ih.numel() + layer.w_hh.numel() for layer in model.layers) + model.decoder.weight.numel()
        for precision in precisions:
            for unfused in (False, True):
                stepper = Stepper(model, precision)
                if not (unfused and stepper.stack is None):
                    runs[cell, precision, unfused] = (stepper, model, macs)
    times = {key: [] for key in runs}
    for _ in range(ROUNDS):
        for key, (stepper, model, _) in runs.items():
            stepper.unfused = key[2]
            times[key].append(tokens_per_second(stepper, model))
    lstm = {p: statistics.median(times["lstm", p, False]) * runs["lstm", p, False][2] for p in precisions}
    print("| cell | weights | step | tokens/s | M multiply-adds / token | per MAC vs lstm |\n|---|---|---|---:|---:|---:|")
    for (cell, precision, unfused), values in times.items():
        speed, macs = statistics.median(values), runs[cell, precision, unfused][2]
        print(f"| {cell} | {precision} | {'op by op' if unfused else 'one op'} | {speed:,.0f} | {macs / 1e6:.2f} | "
              f"{speed * macs / lstm[precision]:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["lstm", "gru", "slstm", "peephole", "coupled", "rnn"],
         sys.argv[2].split(",") if len(sys.argv) > 2 else ["fp32", "int8"])
