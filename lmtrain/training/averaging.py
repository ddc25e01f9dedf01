"""NT-ASGD (Merity et al. 2017): when to start averaging the weights, and the average itself."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from lmtrain.errors import LmtrainError
from lmtrain.model import LanguageModel


class WeightAverage:
    """NT-ASGD's average of the weights over every optimizer step since it started.

    `update()` after each step; `swapped_in()` puts the average into the model for a while (for
    validation and checkpoints) and the trained weights back afterwards.
    """

    def __init__(self, model: LanguageModel):
        self.params = list(model.parameters())
        self.average = [p.detach().clone() for p in self.params]
        self.count = 1

    def state(self) -> dict[str, Any]:
        return {"average": [a.detach() for a in self.average], "count": self.count}

    @torch.no_grad()
    def load(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self.average):
            raise LmtrainError("the checkpoint's weight average does not match the model")
        for avg, stored in zip(self.average, state["average"]):
            avg.copy_(stored)
        self.count = state["count"]

    @torch.no_grad()
    def update(self) -> None:
        self.count += 1
        for avg, p in zip(self.average, self.params):
            avg.lerp_(p, 1.0 / self.count)

    @contextmanager
    def swapped_in(self):
        kept = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, avg in zip(self.params, self.average):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    p.copy_(k)


def nt_trigger(history: list[float], nonmono: int) -> bool:
    """NT-ASGD's switch (Merity et al. 2017): the latest validation loss is worse than the best of
    those before the last `nonmono` checks."""
    earlier = history[:-1]
    return len(earlier) > nonmono and history[-1] > min(earlier[:-nonmono])
