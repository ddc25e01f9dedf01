"""Zoneout (Krueger et al. 2017, "Zoneout: Regularizing RNNs by Randomly Preserving Hidden
Activations"): between the steps of a recurrence, each unit of a carried state keeps its previous
value with probability p instead of taking its new one.

    training:    s_t = m_t ⊙ s_{t-1} + (1 − m_t) ⊙ s̃_t     m_t ~ Bernoulli(p): per unit, step and stream
    evaluation:  s_t = p s_{t-1} + (1 − p) s̃_t             its expectation (generation too)

s̃_t is what the cell's step makes of s_{t-1}; s_t is what is carried to the next step and, for h,
the layer's output y_t (the zoned h is both, as in the paper's LSTM). model.zoneout_hidden is p
for h, model.zoneout_cell for the cell's c: for the states `zoned_names` gives. The slstm keeps
c, n and m together (one mask): its (c, n, m) stands for c·e^m and n·e^m, so in training a
unit keeps all three, and at evaluation the expectation is that of c·e^m and n·e^m, held
stabilised (`expect_scaled`).

Masks are drawn once per window, up front, from torch's generator on the input's device
(`draw`: h's then the cell's, each (T, B, H) bool): the same draws in the same order whatever
path runs the window, so a seeded run and its resume draw the same masks.

A `Zone` is one layer's zoneout over one window. It runs inside the recurrence engine's loop
(lmtrain.model.recurrence.Recurrence, given `Zoned(steps, zone)`: `mix` after each step,
`mix_backward` in its hand-written backward), and for layers of their own (mogrifier, qrnn,
dglstm) in `stepwise`, which runs their window function a step at a time and mixes in autograd.
`reference` is the plain-autograd definition the tests hold both to.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

Keep = Tensor | float | None  # (T, B, H) bool masks (training), p (evaluation), or None: not zoned


def zoned_names(cell: ModuleType, names: tuple[str, ...]) -> dict[str, str]:
    """The states of `names` (a layer's state, h first) that zoneout acts on -> "hidden" or "cell",
    the key whose p each takes: h, and the cell's ZONEOUT_CELL (default its c; none without one)."""
    cell_states = getattr(cell, "ZONEOUT_CELL", ("c",))
    return {name: "hidden" if name == "h" else "cell" for name in names if name == "h" or name in cell_states}


def probabilities(cell: ModuleType, names: tuple[str, ...], config) -> tuple[float, ...]:
    """Each state's p (0.0: not zoned) from config's model.zoneout_hidden and model.zoneout_cell
    (a ModelConfig, or None: no zoneout)."""
    if config is None:
        return (0.0,) * len(names)
    which = zoned_names(cell, names)
    p = {"hidden": config.zoneout_hidden, "cell": config.zoneout_cell}
    return tuple(p[which[name]] if name in which else 0.0 for name in names)


@dataclass(frozen=True)
class Zone:
    """One layer's zoneout over one window, per state of its tuple (h first).

    keep[k]: (T, B, H) bool, True where the unit keeps s_{t-1} (training); a float p, the
    expectation (evaluation); None, not zoned.
    scaled: (k_scale, (k, ...)): at evaluation, the states k stand for s·e^{s[k_scale]} (the
    slstm's c and n, scaled by m), so their expectation is taken as `expect_scaled` does.
    """

    keep: tuple[Keep, ...]
    scaled: tuple[int, tuple[int, ...]] | None = None

    def expecting_scaled(self) -> bool:
        """Whether the scaled states are mixed by expect_scaled: at evaluation, when they are zoned."""
        return self.scaled is not None and isinstance(self.keep[self.scaled[0]], float)

    def mix(self, t: int, prev: tuple[Tensor, ...], new: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Step t's carried state from s_{t-1} (prev) and the step's s̃_t (new), each (B, H)."""
        if not self.expecting_scaled():
            return tuple(mix_one(keep, t, p, n) for keep, p, n in zip(self.keep, prev, new))
        scale, parts = self.scaled
        out = [mix_one(keep, t, p, n) if k != scale and k not in parts else None
               for k, (keep, p, n) in enumerate(zip(self.keep, prev, new))]
        mixed = expect_scaled(self.keep[scale], [prev[k] for k in parts], prev[scale], [new[k] for k in parts], new[scale])
        for k, s in zip((*parts, scale), mixed):
            out[k] = s
        return tuple(out)

    def mix_backward(self, t: int, prev: tuple[Tensor, ...], new: tuple[Tensor, ...],
                     d: list[Tensor]) -> tuple[list[Tensor | None], list[Tensor]]:
        """The gradient d of step t's carried state -> (its direct part to s_{t-1}, None where there
        is none; its part to s̃_t)."""
        pairs = [mix_one_backward(keep, t, g) for keep, g in zip(self.keep, d)]
        if self.expecting_scaled():
            scale, parts = self.scaled
            grads = expect_scaled_backward(self.keep[scale], [prev[k] for k in parts], prev[scale], [new[k] for k in parts],
                                           new[scale], [d[k] for k in parts], d[scale])
            for k, pair in zip((*parts, scale), grads):
                pairs[k] = pair
        return [a for a, _ in pairs], [b for _, b in pairs]


def mix_one(keep: Keep, t: int, prev: Tensor, new: Tensor) -> Tensor:
    if keep is None:
        return new
    if isinstance(keep, float):
        return prev * keep + new * (1.0 - keep)
    return torch.where(keep[t], prev, new)  # exactly s_{t-1} where kept, exactly s̃_t elsewhere


def mix_one_backward(keep: Keep, t: int, d: Tensor) -> tuple[Tensor | None, Tensor]:
    if keep is None:
        return None, d
    if isinstance(keep, float):
        return d * keep, d * (1.0 - keep)
    return torch.where(keep[t], d, 0.0), torch.where(keep[t], 0.0, d)


def expect_scaled(p: float, prev: list[Tensor], prev_scale: Tensor, new: list[Tensor], new_scale: Tensor) -> list[Tensor]:
    """The expectation of states held as s·e^μ (each of prev and new beside its log-scale μ):
    p s_{t-1} e^{μ_{t-1}} + (1 − p) s̃_t e^{μ̃_t}, held again as s'·e^{μ'} with μ' = max(μ_{t-1}, μ̃_t),
    so that neither exponential can overflow:

        a = p e^{μ_{t-1} − μ'},  b = (1 − p) e^{μ̃_t − μ'},  s' = a s_{t-1} + b s̃_t

    -> [each s', then μ']."""
    top = torch.maximum(prev_scale, new_scale)
    a, b = torch.exp(prev_scale - top) * p, torch.exp(new_scale - top) * (1.0 - p)
    return [a * s + b * n for s, n in zip(prev, new)] + [top]


def expect_scaled_backward(p: float, prev: list[Tensor], prev_scale: Tensor, new: list[Tensor], new_scale: Tensor,
                           d: list[Tensor], d_scale: Tensor) -> list[tuple[Tensor, Tensor]]:
    """expect_scaled's gradients: (d s_{t-1}, d s̃_t) for each state, then (d μ_{t-1}, d μ̃_t). The
    max's gradient is torch.maximum's: all to the larger, half to each at a tie (share)."""
    top = torch.maximum(prev_scale, new_scale)
    a, b = torch.exp(prev_scale - top) * p, torch.exp(new_scale - top) * (1.0 - p)
    share = ((prev_scale - new_scale).sign() + 1.0) * 0.5  # d μ' / d μ_{t-1}
    da = sum(g * s for g, s in zip(d, prev))  # the gradient of a, and of b
    db = sum(g * n for g, n in zip(d, new))
    # a = p e^{μ_{t-1} − μ'}: d a / d μ_{t-1} = a (1 − share), d a / d μ̃ = −a (1 − share); b alike with share
    k = da * a * (1.0 - share) - db * b * share
    return [(g * a, g * b) for g in d] + [(k + d_scale * share, d_scale * (1.0 - share) - k)]


def draw(probabilities: tuple[float, ...], names: tuple[str, ...], cell: ModuleType, x: Tensor, hidden: int,
         training: bool) -> Zone | None:
    """One window's Zone for a layer whose state `names` take `probabilities` (`probabilities()`),
    over x (T, B, ·); None when no state is zoned (the layer's paths run as without zoneout).
    Training draws h's mask, then the cell's (one for all of ZONEOUT_CELL), each (T, B, H) bool."""
    if not any(probabilities):
        return None
    which = zoned_names(cell, names)
    keep: list[Keep] = [None] * len(names)
    masks: dict[str, Tensor] = {}
    for k, (name, p) in enumerate(zip(names, probabilities)):
        if not p:
            continue
        if not training:
            keep[k] = float(p)
            continue
        group = which[name]
        if group not in masks:
            masks[group] = torch.rand(x.shape[0], x.shape[1], hidden, device=x.device) < p
        keep[k] = masks[group]
    scale = getattr(cell, "ZONEOUT_LOG_SCALE", None)
    scaled = None
    if scale is not None and keep[names.index(scale)] is not None:
        scaled = (names.index(scale), tuple(names.index(n) for n in getattr(cell, "ZONEOUT_CELL") if n != scale))
    return Zone(tuple(keep), scaled)


class Zoned:
    """A cell's steps (its module, or fused.CompiledSteps) with one window's Zone, for the engine
    (lmtrain.model.recurrence.Recurrence reads `zone`; the steps resolve as the wrapped ones)."""

    def __init__(self, steps, zone: Zone):
        self.steps, self.zone = steps, zone

    def resolve(self, which: str, args: tuple):
        resolve = getattr(self.steps, "resolve", None)
        return resolve(which, args) if resolve is not None else getattr(self.steps, f"{which}_step")


def stepwise(run_window, x: Tensor, state: tuple[Tensor, ...], zone: Zone, lower: Tensor | None = None,
             up: int | None = None):
    """A layer of its own with zoneout: its window function a step at a time, each step's state
    mixed (Zone.mix, in autograd; each step's own backward is the layer's).

    run_window(x (1, B, I), state) -> y, new state; or, with `lower` (T, B, ·) given (what the
    layer below handed up), run_window(x, state, lower[t:t+1]) -> y, new state, ignored.
    up: the index of the state the layer hands up (dglstm: its c), whose zoned values it hands
    up, (T, B, H). -> y (T, B, H) (the zoned h), the final state, and what it hands up (or None).
    """
    ys, ups = [], []
    for t in range(x.shape[0]):
        args = (x[t : t + 1], state) if lower is None else (x[t : t + 1], state, lower[t : t + 1])
        new = run_window(*args)[1]
        state = zone.mix(t, state, tuple(new))
        ys.append(state[0])
        if up is not None:
            ups.append(state[up])
    return torch.stack(ys), state, (torch.stack(ups) if up is not None else None)


def reference(run_window, x: Tensor, state: tuple[Tensor, ...], keep: tuple[Keep, ...],
              scaled: tuple[int, tuple[int, ...]] | None = None, lower: Tensor | None = None):
    """The plain-autograd definition, for the tests: run_window (a cell's reference over a window:
    x (1, B, I), state -> y, new state; with `lower`, also given lower[t : t + 1]) a step at a time,
    s_t = m s_{t-1} + (1 − m) s̃_t with m the float of keep[k][t] (training) or keep[k] itself
    (evaluation); `scaled` as in Zone, at evaluation, its expectation written with the scales'
    exponentials themselves. -> y (T, B, H), the final state, and every state's carried values
    s_1 .. s_T, each (T, B, ·)."""
    trail = []
    for t in range(x.shape[0]):
        new = run_window(x[t : t + 1], state, *(() if lower is None else (lower[t : t + 1],)))[1]
        out = []
        for k, (s, n) in enumerate(zip(state, new)):
            m = keep[k] if keep[k] is None or isinstance(keep[k], float) else keep[k][t].to(s.dtype)
            out.append(n if m is None else m * s + (1 - m) * n)
        if scaled is not None and isinstance(keep[scaled[0]], float):
            k_scale, parts = scaled
            p, mu = keep[k_scale], torch.maximum(state[k_scale], new[k_scale])
            for k in parts:  # p·s·e^{μ_{t-1}} + (1 − p)·s̃·e^{μ̃}, written as s'·e^{μ'}
                out[k] = (p * state[k] * torch.exp(state[k_scale]) + (1 - p) * new[k] * torch.exp(new[k_scale])) / torch.exp(mu)
            out[k_scale] = mu
        state = tuple(out)
        trail.append(state)
    carried = tuple(torch.stack(s) for s in zip(*trail))
    return carried[0], state, carried
