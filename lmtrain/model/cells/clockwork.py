"""The clockwork RNN (Koutník, Greff, Gomez & Schmidhuber 2014): a tanh RNN whose H units are g
modules of k = H / g units each (where g does not divide H, the first H mod g modules have one unit
more: 650 units in 4 modules are 163, 163, 162, 162), module i with period T_i
(model.clockwork_periods, sorted non-decreasing), which updates only at the steps t with
t mod T_i = 0 and copies itself between:

    a_t = W_ih x_t + (W_hh ⊙ M) h_{t-1} + b          (H,)
    h_t[i] = tanh(a_t[i])   if t mod T_i = 0          for each module i (its k units)
             h_{t-1}[i]     otherwise

M is a fixed 0/1 mask of (H, H) blocks: module i (a row block, W_hh being (out, in)) receives from
module j (a column block) only if T_j >= T_i, so slow modules feed fast ones and not the other way,
the paper's rule (j feeds i if T_i < T_j) with each module's own block, and modules of equal period
feeding each other both ways; with the modules sorted by period, W_hh ⊙ M is block-upper-triangular,
as the paper's W_H (whose rows are also the receiving units). The masked blocks are set to 0 at
init and the mask is applied in every forward, so they get no gradient and never act, whatever a
checkpoint holds there.

t is the stream's step counter, from 0 at a zero state (a stream's first step updates every
module): the state tuple is (h, t), h (B, H) and t (B, 1), float like h (so it travels, detaches,
checkpoints and resumes with the rest of the state), kept modulo the periods' least common
multiple L (which every T_i divides: t mod T_i is unchanged) so that it stays an exact small
integer (model config validation bounds L by 2^24, float32's exact integers); the arithmetic on it
is done in int64.

`reference` is the plain-autograd definition; `run` is the fast path: one autograd Function over
the window (Clockwork) with a hand-written backward. Its forward makes the input projections of
all steps in one product, then per step one product h_{t-1} (W_hh ⊙ M)ᵀ, tanh and the modules'
copy; the backward runs the steps in reverse with one product each (the gradient back to h_{t-1})
and ends with one product per weight over the whole window (lmtrain.model.kernels.mixed's
sequence_grads). compute_dtype bfloat16: every product takes bfloat16 operands and sums in float32;
states and gradients stay float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmtrain.config import ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model.kernels import mixed
from lmtrain.model import zoneout
from lmtrain.model.layer import RecurrentLayer

# the layer's parameters are the rnn's (w_ih (H, I), w_hh (H, H), b_ih (H,)); its state (h, t)
GATES, STATE, RECURRENT_BIAS, EXTRA = 1, ("h", "t"), False, {}
EXTENDS = "rnn"  # the cell this one adds to (one module of period 1 is it): `lmtrain bench` times it beside this one


def module_sizes(modules: int, hidden: int) -> list[int]:
    """The units of each of `modules` modules of a layer of `hidden` units, in order: H // g each,
    one more for the first H mod g."""
    if modules > hidden:
        raise LmtrainError(f"config key 'model.clockwork_periods' gives {modules} modules, more than a clockwork "
                           f"layer's {hidden} units")
    return [hidden // modules + (i < hidden % modules) for i in range(modules)]


def unit_periods(periods: tuple[int, ...], hidden: int, device: torch.device | None = None) -> Tensor:
    """Each unit's module period, (H,) int64: T_i repeated for each of module i's units."""
    sizes = torch.tensor(module_sizes(len(periods), hidden), device=device)
    return torch.tensor(periods, device=device).repeat_interleave(sizes)


def recurrent_mask(periods: tuple[int, ...], hidden: int, device: torch.device | None = None) -> Tensor:
    """M (H, H) bool: M[a, b] is whether unit a (a row of W_hh) receives from unit b, i.e. b's
    module period is at least a's; block-upper-triangular for sorted periods."""
    period = unit_periods(periods, hidden, device)
    return period[None, :] >= period[:, None]


def steps_of(counter: Tensor) -> Tensor:
    """The state's t (B, 1), float, as the integers it holds (int64): the arithmetic on it is
    exact in int64 whatever the float's width."""
    return counter.detach().round().long()


def ticks(counter: Tensor, periods: tuple[int, ...], steps: int, hidden: int) -> Tensor:
    """counter (B, 1), the state's t -> (steps, B, H) bool: whether each unit's module updates at
    each of the next `steps` steps, (t + s) mod T_i = 0."""
    s = torch.arange(steps, device=counter.device).view(steps, 1, 1)
    period = unit_periods(periods, hidden, counter.device)
    return torch.remainder(steps_of(counter).unsqueeze(0) + s, period) == 0


def advanced(counter: Tensor, periods: tuple[int, ...], steps: int) -> Tensor:
    """The counter `steps` steps on, modulo the periods' least common multiple: (B, 1), counter's dtype."""
    return torch.remainder(steps_of(counter) + steps, math.lcm(*periods)).to(counter.dtype)


def reference(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
              periods: tuple[int, ...]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The equations in plain autograd: x (T, B, I), state (h (B, H), t (B, 1)) -> y (T, B, H),
    the final (h, t)."""
    h, t = state
    hidden = h.size(1)
    w = w_hh * recurrent_mask(periods, hidden, h.device)
    period = unit_periods(periods, hidden, h.device)
    step = steps_of(t)  # (B, 1) int64
    outputs = []
    for x_t in x:
        n = torch.tanh(x_t @ w_ih.t() + h @ w.t() + b_ih)
        h = torch.where(torch.remainder(step, period) == 0, n, h)  # (B, H): the modules due at this step update
        outputs.append(h)
        step = step + 1
    return torch.stack(outputs), (h, torch.remainder(step, math.lcm(*periods)).to(t.dtype))


def run(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, periods: tuple[int, ...],
        compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """What `reference` computes, on the fast path (Clockwork); compute_dtype as
    lmtrain.model.kernels.mixed (ignored unless x is float32)."""
    if x.dtype != torch.float32:
        compute_dtype = None
    h0, counter = state
    w = w_hh * recurrent_mask(periods, h0.size(1), h0.device)  # outside the loop: autograd zeroes the masked blocks' gradient
    y, h = Clockwork.apply(compute_dtype, x, h0, ticks(counter, periods, x.size(0), h0.size(1)), w_ih, w, b_ih)
    return y, (h, advanced(counter, periods, x.size(0)))


class Clockwork(torch.autograd.Function):
    """y, h_T = Clockwork.apply(compute_dtype, x, h_0, due, w_ih, w_hh, b_ih).

    x: (T, B, I); h_0: (B, H); due: (T, B, H) bool, whether each unit's module updates at step t
    (ticks); w_ih: (H, I); w_hh: (H, H), already masked; b_ih: (H,). y: (T, B, H).
    Kept for the backward: h_0 .. h_{T-1} and the tanh values n_t (T, B, H).
    """

    @staticmethod
    def forward(ctx, compute_dtype, x: Tensor, h0: Tensor, due: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor):
        steps, batch, inputs = x.shape
        hidden = h0.size(1)
        op = lambda t: mixed.operand(t, compute_dtype)  # noqa: E731
        w_in, w = op(w_ih), op(w_hh)
        # the input projections of every step, one product: (T·B, I) -> (T, B, H)
        xw = mixed.mm(op(x.reshape(steps * batch, inputs)), w_in.t(), b_ih).view(steps, batch, hidden)
        w_t = w.t()
        ys = x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T
        ns = x.new_empty(steps, batch, hidden)  # tanh(a_t), what the due modules take
        ys[0] = h0
        for t in range(steps):
            n = torch.tanh(mixed.mm(op(ys[t]), w_t, xw[t]), out=ns[t])
            torch.where(due[t], n, ys[t], out=ys[t + 1])
        ctx.compute_dtype = compute_dtype
        ctx.save_for_backward(x, ys, ns, due, w_in, w)
        return ys[1:].clone(), ys[steps].clone()

    @staticmethod
    def backward(ctx, dy: Tensor | None, dh_last: Tensor | None):
        x, ys, ns, due, w_in, w = ctx.saved_tensors
        compute_dtype = ctx.compute_dtype
        op = lambda t: mixed.operand(t, compute_dtype)  # noqa: E731
        steps, batch, hidden = ns.shape
        da = ns.new_empty(steps, batch, hidden)  # the gradient at each step's pre-activation a_t
        dh = dh_last.clone() if dh_last is not None else ns.new_zeros(batch, hidden)
        zero = ns.new_zeros(())
        for t in reversed(range(steps)):
            if dy is not None:
                dh = dh + dy[t]
            # a due module's units: dn = dh, da = dn (1 - n²); the others pass dh on unchanged
            torch.where(due[t], dh, zero, out=da[t])
            da[t].mul_(1 - ns[t].square())
            dh = torch.where(due[t], zero, dh) + mixed.mm(op(da[t]), w)
        dx, dw_ih, dw_hh, db, _ = mixed.sequence_grads(da, da, x, ys[:-1], w_in, compute_dtype, ctx.needs_input_grad[1])
        return None, dx, dh, None, dw_ih, dw_hh, db


class Layer(RecurrentLayer):
    """The rnn's parameters (w_ih (H, I), w_hh (H, H), b_ih (H,)) and the periods; state (h, t)."""

    def __init__(self, cell, input_size: int, hidden_size: int, config: ModelConfig | None = None, below=None):
        config = config or ModelConfig()
        super().__init__(cell, input_size, hidden_size, config, below)
        self.periods = config.periods
        module_sizes(len(self.periods), hidden_size)  # no more modules than units

    @staticmethod
    def state_widths(cell, input_size: int, hidden_size: int, config: ModelConfig | None = None) -> dict[str, int]:
        """h (B, H) and the step counter t (B, 1)."""
        return {"h": hidden_size, "t": 1}

    def initialise(self, config: ModelConfig) -> None:
        """The rnn's (model.recurrent_init), then W_hh's masked blocks 0, so the stored W_hh is
        itself block-upper-triangular."""
        super().initialise(config)
        with torch.no_grad():
            self.w_hh.mul_(recurrent_mask(self.periods, self.hidden_size, self.w_hh.device))

    def init_state(self, batch_size: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(h (B, H), t (B, 1)), both zero: the stream's first step updates every module."""
        return like.new_zeros(batch_size, self.hidden_size), like.new_zeros(batch_size, 1)

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weight_drop: float = 0.0,
                compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        w_hh = self.w_hh
        if weight_drop and self.training:  # DropConnect on W_hh, one mask for the window (as run_layer)
            w_hh = torch.nn.functional.dropout(w_hh, weight_drop, True)
        zone = self.zone(x)
        if zone is None:
            return run(x, state, self.w_ih, w_hh, self.b_ih, self.periods, compute_dtype)
        # zoneout (on h; the counter is never zoned): the window function a step at a time, mixed between
        y, final, _ = zoneout.stepwise(lambda x, s: run(x, s, self.w_ih, w_hh, self.b_ih, self.periods, compute_dtype),
                                       x, state, zone)
        return y, final
