"""One token per stream per call: a trained model's weights prepared for generation's small products.

A training step multiplies T·B rows by each weight; a generation step multiplies B rows (one
per stream, often 1), so each product reads the whole weight for very little arithmetic and its
speed is that of the weights arriving from memory. The stepper prepares them once:

    layer 0:   xg = TABLE[token]                       (B, G·H_0)   the embedding and W_ih folded:
                                                                    TABLE = E W_ih^T + b_ih (V, G·H_0)
               hg = h W_hh^T                           (B, G·H_0)
    layer l:   gates = [x, h] [W_ih, W_hh]^T + b_ih    (B, G·H_l)   one product for both, for cells
                                                                    without a recurrent bias (GRU: two)
    decoder:   logits = h_L W_dec^T + b_dec            (B, V)

then each layer's state follows from its cell's own pointwise step (lmtrain/model/cells; on the
CPU in one compiled pass: `lstm_cell_step` for the LSTM, `cell_step` for the others, their
functors generated from the cells' equations). For a stack of any of these cells in
this layout, the whole step (and, in `draw`, the sampling of its tokens before it) is one
compiled op, `stack_step`: the same bits without a dispatch and a thread start-up per
product. The
products' weights are held as float32, bfloat16 or int8 (`WEIGHT_PRECISIONS`, lmtrain/model/kernels/step_ops.py):
smaller weights stay in the CPU's cache. States, gates and logits stay float32. Every stream is
computed on its own, so a stream's logits do not depend on the streams beside it.

Without our compiled ops (no compiler, no AVX-512, or a CUDA model) the products are plain
float32 addmm on the model's device.

A layer of its own (lmtrain.model.layer; dglstm's) runs through its forward on a window of one
token, in float32, by lmtrain.model.layer.stack_forward as in the model: what it hands up (dglstm:
its new cell, (1, B, H)) reaches the layer above as in a window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmtrain.errors import LmtrainError
from lmtrain.model import WEIGHT_PRECISIONS, LanguageModel, State, is_lstm, is_standard, selfcheck, stack_forward, step_ops

TABLE_BUDGET_BYTES = 256 * 2**20  # above this, layer 0 multiplies the embedding row instead


def available_precisions(device: torch.device) -> list[str]:
    """The weight precisions this machine's compiled ops offer on `device` (fp32 always)."""
    return [p for p in WEIGHT_PRECISIONS if p == "fp32" or step_ops.offers(p, device)]


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> the fastest precision this machine offers: int8, else bf16, else fp32. On PTB
    the three give the same test perplexity to within 0.07 (docs/speed.md, `lmtrain bench --generate --run`)."""
    have = available_precisions(device)
    if name == "auto":
        return have[-1]
    if name not in WEIGHT_PRECISIONS:
        raise LmtrainError(f"--precision must be auto, {', '.join(WEIGHT_PRECISIONS)}; got '{name}'")
    if name not in have:
        need = {"bf16": "AVX512-BF16", "int8": "AVX512-VNNI"}[name]
        raise LmtrainError(f"--precision {name} needs a CPU with {need} and the compiled kernels; this machine offers {', '.join(have)}")
    return name


@dataclass
class Product:
    """x (B, K) float32 -> x W^T + b (B, N) float32, W held in its prepared form."""

    weight: Tensor  # panels (compiled) or the float32 (N, K) matrix (fallback)
    scales: Tensor
    sums: Tensor
    bias: Tensor
    compiled: bool

    @classmethod
    def prepare(cls, weight: Tensor, bias: Tensor | None, precision: str) -> Product:
        weight = weight.detach().float().contiguous()
        bias = torch.zeros(weight.size(0), device=weight.device) if bias is None else bias.detach().float().contiguous()
        if not step_ops.offers(precision, weight.device):
            empty = weight.new_empty(0)
            return cls(weight, empty, empty, bias, False)
        return cls(*step_ops.pack(weight, precision), bias, True)

    def __call__(self, x: Tensor) -> Tensor:
        if self.compiled:
            return step_ops.linear(x, self.weight, self.scales, self.sums, self.bias)
        # one product per row, as the compiled op does, so rows never depend on the batch
        rows = x.shape[0]
        return torch.baddbmm(self.bias.view(1, 1, -1).expand(rows, 1, -1), x.unsqueeze(1),
                             self.weight.t().unsqueeze(0).expand(rows, -1, -1)).squeeze(1)


class Stepper:
    """model (eval) -> step(tokens, state): one token per stream, logits for the next.

    The products hold copies of the weights: a stepper serves the model as it was when made. Its
    working memory is reused from step to step, so a stepper serves one caller at a time.
    `unfused` runs the stack's step op by op instead of as one op (the same bits; for tests
    and benchmarks).
    """

    unfused = False

    def __init__(self, model: LanguageModel, precision: str = "fp32"):
        self.cells = [layer.cell for layer in model.layers]
        # layers of their own (lmtrain.model.layer): run a step at a time through their forward, in float32
        self.own = [None if is_standard(layer) else layer for layer in model.layers]
        self.extras = [tuple(p.detach() for p in layer.extra) if is_standard(layer) else () for layer in model.layers]
        first = model.layers[0]
        embedding = model.embedding.weight.detach().float()
        self.table = None
        if self.own[0] is None and embedding.size(0) * first.w_ih.size(0) * 4 <= TABLE_BUDGET_BYTES:
            with torch.no_grad():  # fp32 exact: the row a word always gives
                self.table = torch.addmm(first.b_ih.detach().float(), embedding, first.w_ih.detach().float().t())
        self.embedding = embedding
        self.inputs: list[Product | None] = []  # W_ih alone, where it is not folded into the table or a joint product
        self.recurrent: list[Product] = []  # W_hh, or [W_ih, W_hh] side by side (joint)
        self.joint: list[bool] = []
        for k, layer in enumerate(model.layers):
            if self.own[k] is not None:
                self.joint.append(False)
                self.inputs.append(None)
                self.recurrent.append(None)
                continue
            b_hh = layer.b_hh.detach() if layer.b_hh is not None else None
            joint = k > 0 and b_hh is None and self.own[k - 1] is None
            self.joint.append(joint)
            if joint:
                self.inputs.append(None)
                self.recurrent.append(Product.prepare(torch.cat([layer.w_ih, layer.w_hh], 1), layer.b_ih, precision))
            else:
                folded = k == 0 and self.table is not None
                self.inputs.append(None if folded else Product.prepare(layer.w_ih, layer.b_ih, precision))
                self.recurrent.append(Product.prepare(layer.w_hh, b_hh, precision))
        self.decoder = Product.prepare(model.decoder.weight, model.decoder.bias, precision)
        self.lstm_step = step_ops.lstm_cell_step if step_ops.ops_for(embedding.device) is not None else None
        self.names = [cell.__name__.rsplit(".", 1)[-1] for cell in self.cells]
        # every other cell's pointwise step as one op: its functor generated from its equations
        self.cell_steps = [self.lstm_step is not None and not is_lstm(cell) and step_ops.has_cell_step(name)
                           for cell, name in zip(self.cells, self.names)]
        if any(own is not None for own in self.own):
            self.stack = None
            self.scratch = torch.empty(0, dtype=torch.uint8)
            return
        # the stack in the layout above, all of it compiled: the whole step as one op
        self.hidden = [layer.hidden_size for layer in model.layers]
        self.widths = [len(cell.STATE) for cell in self.cells]
        products = []
        for k in range(len(self.cells)):
            products += [self.inputs[k]] if k > 0 and not self.joint[k] else []
            products.append(self.recurrent[k])
        products.append(self.decoder)
        self.stack = None
        if (self.lstm_step is not None and self.table is not None and all(p.compiled for p in products)
                and all(is_lstm(cell) or ok for cell, ok in zip(self.cells, self.cell_steps))):
            self.stack = tuple([getattr(p, name) for p in products] for name in ("weight", "scales", "sums", "bias"))
            self.layout = step_ops.stack_layout(self.names, self.widths, [len(e) for e in self.extras],
                                                [k > 0 and not joint for k, joint in enumerate(self.joint)])
            self.flat_extra = [e.float().contiguous() for extra in self.extras for e in extra]
        self.scratch = torch.empty(0, dtype=torch.uint8)  # the whole-step op's working memory, grown by the op
        if self.stack is not None and not self.whole_step_checked(precision):
            self.stack = None

    def whole_step_checked(self, precision: str) -> bool:
        """Whether the whole-step op may run: not turned off, and it agrees with the op-by-op step
        (the same products, so the same numbers) on two streams from a zero state
        (lmtrain.model.kernels.selfcheck; a failure turns it off for the process)."""
        if selfcheck.is_off("step-op"):
            return False
        tokens = torch.tensor([0, self.embedding.size(0) - 1])
        zeros = [torch.zeros(2, h) for h, n in zip(self.hidden, self.widths) for _ in range(n)]

        def step(unfused: bool):
            def run(*flat):
                kept, self.unfused = self.unfused, unfused
                try:
                    logits, state = self.step(tokens, self.regroup(list(flat)))
                finally:
                    self.unfused = kept
                return [logits, *(s for layer in state for s in layer)]

            return run

        key = (precision, tuple(self.names), tuple(self.hidden), self.embedding.shape, self.stack[3][-1].numel())
        failure = selfcheck.check("step-op", key, step(False), step(True), zeros, selfcheck.tolerance(torch.float32))
        if failure is not None:
            selfcheck.turn_off("step-op", failure, lambda: "the op-by-op step")
        return failure is None

    def regroup(self, flat: list[Tensor]) -> State:
        """Every layer's states in one list -> the model's layout (a tuple per layer)."""
        state, at = [], 0
        for n in self.widths:
            state.append(tuple(flat[at : at + n]))
            at += n
        return state

    def table_rows(self, tokens: Tensor) -> Tensor:
        """TABLE[tokens] (B, G·H_0): index_select copies whole rows, where advanced indexing
        (table[tokens]) goes element by element at twice the time (32 rows of 2600: 115 -> 59 µs)."""
        return self.table.index_select(0, tokens)

    def can_draw(self) -> bool:
        """Whether `draw` is offered: the stack's whole step compiled as one op."""
        return self.stack is not None and not self.unfused

    def new_outputs(self, streams: int) -> list[Tensor]:
        """Buffers for one whole-step op's results: [logits (B, V), then every layer's new states]."""
        states = [torch.empty(streams, h) for h, n in zip(self.hidden, self.widths) for _ in range(n)]
        return [torch.empty(streams, self.stack[3][-1].numel())] + states

    def unpack(self, out: list[Tensor]) -> tuple[Tensor, State]:
        """new_outputs' layout -> logits and the state (the model's layout)."""
        return out[0], self.regroup(out[1:])

    @torch.no_grad()
    def draw(self, logits: Tensor, uniforms: Tensor, temperature: float, state: State,
             out: list[Tensor] | None = None) -> tuple[Tensor, Tensor, State]:
        """Draw a token per stream from logits (B, V) (as generate.pick does with neither top-k nor
        top-p: the same tokens), then step on them, in one op -> tokens (B,), the next logits, state.
        `out` (new_outputs, none of them an input) receives the logits and state; fresh ones by default."""
        out = self.new_outputs(logits.size(0)) if out is None else out
        selfcheck.inject("step-op")
        tokens = step_ops.stack_draw(logits.float(), uniforms.float(), temperature, self.table, self.stack, self.layout,
                                     [s.float() for layer in state for s in layer], self.flat_extra, out, self.scratch)
        out[0] = selfcheck.distort("step-op", out[:1])[0]
        return (tokens, *self.unpack(out))

    @torch.no_grad()
    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens (B,) int64 -> logits (B, V) float32 and the new state (the model's layout)."""
        if self.stack is not None and not self.unfused:
            out = self.new_outputs(tokens.size(0))
            selfcheck.inject("step-op")
            step_ops.stack_step(tokens, self.table, self.stack, self.layout, [s.float() for layer in state for s in layer],
                                self.flat_extra, out, self.scratch)
            out[0] = selfcheck.distort("step-op", out[:1])[0]
            return self.unpack(out)
        x = None
        new_state = []
        up = None  # what an own layer hands the layer above (lmtrain.model.layer), for this one step: (1, B, ·)
        for k, (cell, extra) in enumerate(zip(self.cells, self.extras)):
            layer_state = tuple(s.float() for s in state[k])
            h = layer_state[0]
            if self.own[k] is not None:
                inputs = self.embedding[tokens] if k == 0 else x
                y, layer_state, up = stack_forward(self.own[k], inputs.unsqueeze(0), layer_state, up)
                new_state.append(tuple(layer_state))
                x = y[0]
                continue
            up = None
            if is_lstm(cell) and self.lstm_step is not None:
                if self.joint[k]:
                    gates = self.recurrent[k](torch.cat([x, h], 1))
                else:
                    xg = self.table_rows(tokens) if k == 0 and self.table is not None else self.inputs[k](self.embedding[tokens] if k == 0 else x)
                    gates = self.recurrent[k](h).add_(xg)
                x, c = self.lstm_step(gates, layer_state[1])
                new_state.append((x, c))
                continue
            if self.joint[k]:
                xg = self.recurrent[k](torch.cat([x, h], 1))
                hg = torch.zeros_like(xg)
            else:
                if k == 0:
                    xg = self.table_rows(tokens) if self.table is not None else self.inputs[0](self.embedding[tokens])
                else:
                    xg = self.inputs[k](x)
                hg = self.recurrent[k](h)
            if self.cell_steps[k]:  # the cell's generated functor, one op
                layer_state = step_ops.cell_step(self.names[k], xg, hg, layer_state, extra)
            else:
                layer_state, _ = cell.forward_step(xg, hg, layer_state, extra)
            new_state.append(layer_state)
            x = layer_state[0]
        return self.decoder(x), new_state
