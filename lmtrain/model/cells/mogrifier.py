"""The Mogrifier LSTM (Melis, Kočiský & Blunsom 2020): the LSTM of lmtrain.model.cells.lstm, whose
input x and state h first gate each other in turn, r = model.mogrifier_rounds times a step.

From x⁰ = x_t and h⁰ = h_{t-1}, rounds i = 1 .. r:

    odd i:   x ← 2σ(Q^i h + q^i) ⊙ x        Q^i: (I, H), q^i: (I,)
    even i:  h ← 2σ(R^i x + r^i) ⊙ h        R^i: (H, I), r^i: (H,)

then the LSTM step (gate order i, f, g, o) on the mogrified x and h:

    i, f, g, o = σ, σ, tanh, σ of (W_ih x + W_hh h + b),  c' = f ⊙ c + i ⊙ g,  h' = o ⊙ tanh(c')

The carried state is (h', c'): the mogrified h serves this step only. r = 0 is the LSTM itself.

Details as in the authors' code (deepmind/lamb, TiledLSTMCell._do_feature_masking): round 1
gates x; every round has a bias (the paper's equations show none), which starts at 0, so each
2σ(·) starts near 1; with model.mogrifier_rank k > 0 each round's matrix is the product of two
factors, Q^i = Q^i_out Q^i_in, (I, k) and (k, H) (lamb's h·a·b with a = Q_inᵀ, b = Q_outᵀ), each
drawn so that the product's entries spread as those of a full matrix drawn directly would.

Parameters, in state_dict order: w_ih (4H, I), w_hh (4H, H), b_ih (4H,) as the LSTM's (forget_bias
and weight_drop on W_hh act on them as on the LSTM's), then per round `q1`, `r2`, `q3`, ...: the
matrix (`q1`) or its factors (`q1_out`, `q1_in`), then its bias (`q1_bias`).

`reference` is the plain-autograd definition; `run` is the fast path: one autograd Function over
the window (Mogrify) with a hand-written backward, which reuses the LSTM's generated pointwise
step. Per step its products are: one per full-rank round (two per factored one), and the LSTM's
input and recurrent products as one, [x̃, h̃] [W_ih, W_hh]ᵀ. The backward runs the steps in
reverse (the LSTM's pointwise backward, one product back to [x̃, h̃], then the rounds in reverse,
one product each (two factored)); the weight gradients are one product each at the end, over the
whole window. compute_dtype bfloat16: every product takes bfloat16 operands and sums in float32
(lmtrain.model.kernels.mixed); states, masks and gradients stay float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmtrain.config import ModelConfig
from lmtrain.model.cells import lstm
from lmtrain.model.kernels import mixed
from lmtrain.model.layer import RecurrentLayer

GATES, STATE, RECURRENT_BIAS, EXTRA = lstm.GATES, lstm.STATE, lstm.RECURRENT_BIAS, lstm.EXTRA
FORGET_GATE = lstm.FORGET_GATE
EXTENDS = "lstm"  # the cell this one adds to (its rounds 0): `lmtrain bench` times it beside this one

# a round's parameters: (matrix, bias) at full rank, (out factor, in factor, bias) at rank k
Round = tuple[Tensor, ...]


def round_names(rounds: int, rank: int) -> list[tuple[str, ...]]:
    """The parameter names of each round: [("q1", "q1_bias"), ("r2", "r2_bias"), ...], the matrix
    as ("q1_out", "q1_in") at rank > 0."""
    names = []
    for i in range(1, rounds + 1):
        base = f"{'q' if i % 2 else 'r'}{i}"
        names.append(((f"{base}_out", f"{base}_in") if rank else (base,)) + (f"{base}_bias",))
    return names


def round_shapes(rounds: int, rank: int, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every round's parameters, in order: odd rounds map h to x's width, even ones x to h's."""
    shapes = {}
    for i, names in enumerate(round_names(rounds, rank), start=1):
        out, into = (input_size, hidden_size) if i % 2 else (hidden_size, input_size)
        matrices = [(out, rank), (rank, into)] if rank else [(out, into)]
        shapes |= dict(zip(names, [*matrices, (out,)]))
    return shapes


def project(v: Tensor, matrices: tuple[Tensor, ...], bias: Tensor) -> Tensor:
    """v (B, in) -> v Qᵀ + bias (B, out), Q one matrix or the product of two factors (out, k) (k, in)."""
    if len(matrices) == 2:
        return (v @ matrices[1].t()) @ matrices[0].t() + bias
    return v @ matrices[0].t() + bias


def mogrify(x: Tensor, h: Tensor, rounds: tuple[Round, ...]) -> tuple[Tensor, Tensor]:
    """The rounds of one step in plain autograd: x (B, I), h (B, H) -> the mogrified x, h."""
    for i, parameters in enumerate(rounds, start=1):
        *matrices, bias = parameters
        if i % 2:
            x = 2 * torch.sigmoid(project(h, tuple(matrices), bias)) * x
        else:
            h = 2 * torch.sigmoid(project(x, tuple(matrices), bias)) * h
    return x, h


def reference(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
              rounds: tuple[Round, ...] = ()) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The equations in plain autograd: x (T, B, I) -> y (T, B, H), final (h, c); rounds: each
    round's parameters (Round), r = len(rounds)."""
    h, c = state
    outputs = []
    for x_t in x:
        x_m, h_m = mogrify(x_t, h, rounds)
        i, f, g, o = (x_m @ w_ih.t() + h_m @ w_hh.t() + b_ih).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), (h, c)


def run(x: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, rounds: tuple[Round, ...] = (),
        compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """What `reference` computes, on the fast path (Mogrify); compute_dtype as lmtrain.model.kernels.mixed
    (ignored unless x is float32). Rounds are all full rank or all factored."""
    if x.dtype != torch.float32:
        compute_dtype = None
    factored = bool(rounds) and len(rounds[0]) == 3
    flat = [t for parameters in rounds for t in parameters]
    y, h, c = Mogrify.apply(len(rounds), factored, compute_dtype, x, state[0], state[1], w_ih, w_hh, b_ih, *flat)
    return y, (h, c)


class Mogrify(torch.autograd.Function):
    """y, h_T, c_T = Mogrify.apply(r, factored, compute_dtype, x, h_0, c_0, w_ih, w_hh, b_ih, *rounds' parameters).

    x: (T, B, I); h_0, c_0: (B, H); w_ih: (4H, I); w_hh: (4H, H); b_ih: (4H,); then each round's
    parameters flat, 2 per round (matrix, bias) or 3 if factored (out, in, bias). y: (T, B, H).

    Kept for the backward, per step: every round's mask 2σ(·) and the version of x or h it made
    (the last ones are Z, the LSTM's operand [x̃, h̃], (T, B, I + H)), the factored rounds' inner
    products, and the LSTM's pointwise saved values and c_{t-1}.
    """

    @staticmethod
    def forward(ctx, r: int, factored: bool, compute_dtype, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                b_ih: Tensor, *flat: Tensor):
        steps, batch, inputs = x.shape
        hidden = h0.size(1)
        per = 3 if factored else 2
        rounds = [flat[k * per : (k + 1) * per] for k in range(r)]
        op = lambda t: mixed.operand(t, compute_dtype)  # noqa: E731
        w = op(torch.cat([w_ih, w_hh], 1))  # (4H, I + H)
        w_t = w.t()
        matrices = [tuple(op(m) for m in parameters[:-1]) for parameters in rounds]
        z = x.new_empty(steps, batch, inputs + hidden)  # [x̃_t, h̃_t]: the LSTM's operand of each step
        xs, hs = versions(x, z, r, inputs, hidden)  # versions of x and h; hs[0] is filled as the steps run
        masks = [x.new_empty(steps, batch, inputs if i % 2 else hidden) for i in range(1, r + 1)]
        inner = [x.new_empty(steps, batch, m[1].size(0)) for m in matrices] if factored else []
        ys = x.new_empty(steps + 1, batch, hidden)  # h_0 .. h_T
        cs = x.new_empty(steps + 1, batch, hidden)  # c_0 .. c_T
        ys[0], cs[0] = h0, c0
        if (r + 1) // 2 == 0:
            z[:, :, :inputs] = x
        gates = x.new_empty(batch, GATES * hidden)
        zero = x.new_zeros(1, GATES * hidden).expand(batch, -1)  # hg: the recurrent product is in `gates` already
        saved = []
        for t in range(steps):
            hs[0][t] = ys[t]
            for i in range(1, r + 1):
                *_, bias = rounds[i - 1]
                source, before, after = round_operands(i, xs, hs)
                a = round_product(op(source[t]), matrices[i - 1], bias, inner[i - 1][t] if factored else None, op)
                mask = torch.sigmoid(a, out=masks[i - 1][t]).mul_(2)
                torch.mul(mask, before[t], out=after[t])
            mixed.mm(op(z[t]), w_t, b_ih, out=gates)
            (h, c), step_saved = lstm.forward_step(gates, zero, (ys[t], cs[t]), ())
            ys[t + 1], cs[t + 1] = h, c
            saved.append(step_saved)
        ctx.r, ctx.factored, ctx.compute_dtype, ctx.sizes = r, factored, compute_dtype, (inputs, hidden)
        ctx.lstm_saved, ctx.xs, ctx.hs, ctx.masks, ctx.inner = saved, xs, hs, masks, inner
        ctx.save_for_backward(z, ys, cs, w, *(m for parameters in matrices for m in parameters))
        return ys[1:].clone(), ys[steps].clone(), cs[steps].clone()

    @staticmethod
    def backward(ctx, dy: Tensor, dh_last: Tensor, dc_last: Tensor):
        z, ys, cs, w, *flat_matrices = ctx.saved_tensors
        r, factored, compute_dtype = ctx.r, ctx.factored, ctx.compute_dtype
        inputs, hidden = ctx.sizes
        steps, batch, _ = z.shape
        op = lambda t: mixed.operand(t, compute_dtype)  # noqa: E731
        per = 2 if factored else 1
        matrices = [tuple(flat_matrices[k * per : (k + 1) * per]) for k in range(r)]
        xs, hs, masks, inner = ctx.xs, ctx.hs, ctx.masks, ctx.inner
        d_gates = z.new_empty(steps, batch, GATES * hidden)
        d_pre = [torch.empty_like(m) for m in masks]  # each round's gradient at its pre-activation
        d_inner = [torch.empty_like(u) for u in inner]
        dx = z.new_empty(steps, batch, inputs)
        dh = dh_last.clone() if dh_last is not None else z.new_zeros(batch, hidden)
        dc = dc_last.clone() if dc_last is not None else z.new_zeros(batch, hidden)
        for t in reversed(range(steps)):
            if dy is not None:
                dh = dh + dy[t]
            dg, _, (_, dc), _ = lstm.backward_step((dh, dc), ctx.lstm_saved[t], (ys[t], cs[t]), ())
            d_gates[t] = dg
            dz = mixed.mm(op(dg), w)  # (B, I + H): the gradients at x̃ and h̃
            d_x, d_h = dz[:, :inputs], dz[:, inputs:]
            for i in range(r, 0, -1):
                source, before, _ = round_operands(i, xs, hs)
                mask = masks[i - 1][t]
                d_after = d_x if i % 2 else d_h
                # d mask = d_after ⊙ before; mask = 2σ(a): d a = d mask ⊙ mask ⊙ (1 - mask / 2)
                da = torch.mul(d_after * before[t], mask * (1 - 0.5 * mask), out=d_pre[i - 1][t])
                d_before = d_after * mask
                if factored:
                    out_factor, in_factor = matrices[i - 1]
                    du = mixed.mm(op(da), out_factor, out=d_inner[i - 1][t])
                    d_source = mixed.mm(op(du), in_factor)
                else:
                    d_source = mixed.mm(op(da), matrices[i - 1][0])
                if i % 2:
                    d_x, d_h = d_before, d_h + d_source
                else:
                    d_h, d_x = d_before, d_x + d_source
            dx[t] = d_x
            dh = d_h
        rows = steps * batch
        flat = lambda t: op(t.reshape(rows, -1))  # noqa: E731
        dw = mixed.mm(flat(d_gates).t(), flat(z))
        grads = [dw[:, :inputs], dw[:, inputs:], d_gates.reshape(rows, -1).sum(0)]
        for i in range(1, r + 1):
            source, _, _ = round_operands(i, xs, hs)
            da = flat(d_pre[i - 1])
            if factored:
                grads += [mixed.mm(da.t(), flat(inner[i - 1])), mixed.mm(flat(d_inner[i - 1]).t(), flat(source))]
            else:
                grads.append(mixed.mm(da.t(), flat(source)))
            grads.append(d_pre[i - 1].reshape(rows, -1).sum(0))
        return (None, None, None, dx, dh, dc, *grads)


def versions(x: Tensor, z: Tensor, r: int, inputs: int, hidden: int) -> tuple[list[Tensor], list[Tensor]]:
    """The (T, B, ·) buffers of x and h as the rounds change them: xs[0] = x, xs[j] after the j-th
    odd round; hs[0] = h_{t-1}, hs[j] after the j-th even round; the last of each is its part of z."""
    odd, even = (r + 1) // 2, r // 2
    xs = [x] + [x.new_empty(x.shape) for _ in range(odd - 1)] + ([z[:, :, :inputs]] if odd else [])
    hs = [x.new_empty(*x.shape[:2], hidden) for _ in range(even)] + [z[:, :, inputs:]]
    return xs, hs


def round_operands(i: int, xs: list[Tensor], hs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Round i's (source, before, after) buffers: an odd round gates x by h, an even one h by x."""
    if i % 2:
        return hs[(i - 1) // 2], xs[(i - 1) // 2], xs[(i + 1) // 2]
    return xs[i // 2], hs[i // 2 - 1], hs[i // 2]


def round_product(source: Tensor, matrices: tuple[Tensor, ...], bias: Tensor, inner: Tensor | None, op) -> Tensor:
    """source (B, in), operands already rounded -> source Qᵀ + bias (B, out); a factored Q's inner
    product source Q_inᵀ (B, k) lands in `inner`, which the backward reads."""
    if inner is None:
        return mixed.mm(source, matrices[0].t(), bias)
    mixed.mm(source, matrices[1].t(), out=inner)
    return mixed.mm(op(inner), matrices[0].t(), bias)


class Layer(RecurrentLayer):
    """The LSTM's parameters (w_ih, w_hh, b_ih) and each round's (module docstring); state (h, c)."""

    def __init__(self, cell, input_size: int, hidden_size: int, config: ModelConfig | None = None, below=None):
        config = config or ModelConfig()
        self.rounds, self.rank = config.mogrifier_rounds, config.mogrifier_rank
        super().__init__(cell, input_size, hidden_size, config, below)  # below: the same layer on any cell
        self.names = round_names(self.rounds, self.rank)

    @staticmethod
    def shapes(cell, input_size: int, hidden_size: int, config: ModelConfig | None = None,
               below=None) -> dict[str, tuple[int, ...]]:
        config = config or ModelConfig()
        lstm_shapes = RecurrentLayer.shapes(cell, input_size, hidden_size, config)
        return lstm_shapes | round_shapes(config.mogrifier_rounds, config.mogrifier_rank, input_size, hidden_size)

    def initialise(self, config: ModelConfig) -> None:
        """The LSTM's (model.recurrent_init, model.forget_bias); then every round's bias 0 and, at
        rank k, each factor uniform in ±(3 s² / k)^¼, s the bound a full matrix was drawn in
        (model.init_range, or 1/sqrt(H) with recurrent_init torch): their product then has a full
        matrix's variance, s² / 3 (as lamb draws its factors)."""
        super().initialise(config)
        bound = 1 / math.sqrt(self.hidden_size) if config.recurrent_init == "torch" else config.init_range
        with torch.no_grad():
            for names in self.names:
                *matrices, bias = (getattr(self, name) for name in names)
                bias.zero_()
                if self.rank:
                    for m in matrices:
                        nn.init.uniform_(m, -1.0, 1.0).mul_((3 * bound**2 / self.rank) ** 0.25)

    def parameters_of_rounds(self) -> tuple[Round, ...]:
        return tuple(tuple(getattr(self, name) for name in names) for names in self.names)

    def forward(self, x: Tensor, state: tuple[Tensor, ...], weight_drop: float = 0.0,
                compute_dtype: torch.dtype | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        w_hh = self.w_hh
        if weight_drop and self.training:  # DropConnect on W_hh, one mask for the window (as run_layer)
            w_hh = torch.nn.functional.dropout(w_hh, weight_drop, True)
        return run(x, state, self.w_ih, w_hh, self.b_ih, self.parameters_of_rounds(), compute_dtype)
