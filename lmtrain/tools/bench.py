"""Speed and memory of our recurrent stacks against torch's own modules, measured in one process.

Every candidate of one setting (layers × hidden, batch, bptt, dtype) runs round-robin: one
repeat of each in turn, after warm-up, so a slow moment of a shared machine hits all of them
alike; the figure is the median over the repeats. Two things are timed:

  stack: forward + backward of the recurrent layers alone on a random (T, B, H) input, each cell
         against the torch module computing its equations (REFERENCES: lstm against torch.nn.LSTM,
         gru against torch.nn.GRU, rnn against torch.nn.RNN with tanh); the cells torch lacks
         (peephole, coupled, slstm, mogrifier, qrnn, dglstm) against torch.nn.LSTM, or the module of the
         cell they extend (clockwork, whose one module is the rnn, against torch.nn.RNN), and every cell against
         our lstm too (where it is timed: asked for, or the cell one asked for extends, as the mogrifier
         and dglstm do); a stack of one cell is built as the model builds it, each layer on the cell below
         (dglstm's layers above the first depth-gated, its cells passed up the stack);
  step:  a whole training step (embedding, stack, decoder, loss, backward, clipping, SGD) of a
         language model, ours against the same model with torch.nn.LSTM as its stack.

On CUDA the step is also timed with our window captured as a CUDA graph and replayed
(lmtrain.training.graphs; impl "ours+graphs"), as training runs it there, and the LSTM stack with its
window in one persistent kernel launch each way (lmtrain.model.kernels.cuda.lstm_persistent; impl
"ours+persistent").

dtype bf16 is mixed precision as training runs it (train.precision = bf16): float32 weights,
bfloat16 GEMM operands, float32 state and gradients. Ours gets compute_dtype bfloat16; the
references run under torch.autocast(bfloat16), PyTorch's own mixed precision for its modules.

`bench --preset issue7` runs the settings issue 7 asks about (PRESETS below).

fp32 is IEEE float32 for every candidate: TF32 is off for cuDNN (which uses it by default for
torch's modules) and cuBLAS while a benchmark runs (`full_fp32`), as it is for our products.

Peak memory is the highest amount of tensor memory held during one forward + backward, above
what was held before it (on CPU from the profiler's allocation timeline, on CUDA from the caching
allocator's peak); for "ours+graphs" it adds what the captured graph holds between replays (its
private pool: a window's activations and gradients), measured around the capture.

`bench --generate` times sampling instead (lmtrain.tools.bench_generate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmtrain.config import ModelConfig
from lmtrain.model import LanguageModel, get_cell, layer_class, stack_forward
from lmtrain.tools.bench_timing import full_fp32, peak_memory_mb, time_round_robin, with_env

DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # the compute dtype of each; weights stay float32

# our cells that a torch module computes too, with that module (nn.RNN with tanh, as our rnn, which
# has one bias where it has two). The others (peephole, coupled, slstm, mogrifier, qrnn, dglstm) have no counterpart.
REFERENCES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass(frozen=True)
class Setting:
    """One benchmark shape: layers × hidden, batch, bptt (input size = hidden)."""

    layers: int
    hidden_size: int
    batch_size: int
    bptt: int


# named sets of settings for `bench --preset`; issue7: the LSTM against cuDNN at the sizes
# issue 7 names (2 × 650 and 2 × 1500 at batch 20 bptt 35, 1 × 512 at batch 64 bptt 100)
PRESETS = {
    "issue7": (Setting(2, 650, 20, 35), Setting(2, 1500, 20, 35), Setting(1, 512, 64, 100)),
}


@dataclass
class Record:
    what: str  # "stack" or "step"
    cell: str
    impl: str  # "ours", "ours+graphs" (CUDA: the step replayed as a CUDA graph), "ours+persistent" (CUDA: the
    # LSTM stack in one launch per window each way) or "torch"
    layers: int
    hidden_size: int
    batch_size: int
    bptt: int
    dtype: str
    device: str
    tokens_per_s: float
    peak_mem_mb: float
    reference: str | None = None  # the torch module ours is compared with; None on a torch row
    ratio_vs_reference: float | None = None  # ours / the reference's tokens/s, same benchmark, setting and dtype
    ratio_vs_our_lstm: float | None = None  # ours / our lstm's ("ours"), same benchmark, setting and dtype


def reference_cell(cell: str) -> str:
    """The cell whose torch module `cell` is compared with: its own, else the cell's it extends
    (its module's EXTENDS) where torch has that, else the LSTM's."""
    base = cell if cell in REFERENCES else getattr(get_cell(cell), "EXTENDS", None)
    return base if base in REFERENCES else "lstm"


def reference_name(cell: str) -> str:
    """'torch.nn.GRU' for gru, 'torch.nn.RNN' for clockwork; 'torch.nn.LSTM' for the other cells torch lacks."""
    return f"torch.nn.{REFERENCES[reference_cell(cell)].__name__}"


class TorchStack(nn.Module):
    """A reference: torch.nn.LSTM, GRU or RNN (oneDNN or ATen on CPU, cuDNN on CUDA) for `cell`."""

    def __init__(self, cell: str, layers: int, hidden: int):
        super().__init__()
        module = REFERENCES[cell]
        options = {"nonlinearity": "tanh"} if module is nn.RNN else {}  # our rnn's (also nn.RNN's default)
        self.rnn = module(hidden, hidden, num_layers=layers, **options)

    def forward(self, x):
        return self.rnn(x)[0]


class OurStack(nn.Module):
    def __init__(self, cell: str, layers: int, hidden: int):
        super().__init__()
        # the cell's own layer where it has one (at the config's defaults: the mogrifier's 5 full-rank
        # rounds), each on the one below as the model stacks them (dglstm: depth-gated above the first)
        module = get_cell(cell)
        self.layers = nn.ModuleList(layer_class(module)(module, hidden, hidden, None, module if i else None) for i in range(layers))
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def forward(self, x, compute_dtype=None):
        up = None
        for layer in self.layers:
            x, _, up = stack_forward(layer, x, layer.init_state(x.size(1), x), up, compute_dtype=compute_dtype)
        return x


class TorchLSTMLanguageModel(nn.Module):
    """The PyTorch word-language-model example's shape, for the full-step comparison."""

    def __init__(self, vocab: int, layers: int, hidden: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens, state=None):
        y, state = self.lstm(self.embedding(tokens), state)
        return self.decoder(y), state


def forward_in(compute_dtype: torch.dtype | None, ours: bool, device: torch.device, forward: Callable):
    """forward(compute_dtype) for ours; for torch's modules, forward(None) under autocast to `compute_dtype`."""
    if ours or compute_dtype is None:
        return forward(compute_dtype)
    with torch.autocast(device.type, dtype=compute_dtype):
        return forward(None)


def stack_step(stack: nn.Module, x: torch.Tensor, compute_dtype: torch.dtype | None, ours: bool) -> Callable[[], None]:
    def run():
        x.grad = None
        for p in stack.parameters():
            p.grad = None
        y = forward_in(compute_dtype, ours, x.device, lambda dtype: stack(x, dtype) if ours else stack(x))
        y.float().sum().backward()

    return run


def timed_step(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, ours: bool,
               compute_dtype: torch.dtype | None = None) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def run():
        state = model.init_state(tokens.size(1)) if ours else None
        logits, _ = forward_in(compute_dtype, ours, tokens.device, lambda dtype: model(tokens, state, dtype) if ours else model(tokens))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()

    return run


def graphed_timed_step(model: LanguageModel, tokens: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype | None,
                       note: Callable[[str], None]) -> Callable[[], None]:
    """timed_step for our model with its forward + backward captured as a CUDA graph on the first
    call and replayed after (lmtrain.training.graphs.WindowRunner); eager where capture fails (noted)."""
    from lmtrain.training import WindowRunner

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def window(x, y, state):
        logits, state = model(x, state, compute_dtype)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        return loss, state

    runner = WindowRunner(window, list(model.parameters()), True, note)

    def run():
        capturing = not runner.graphs and runner.use_graphs
        before = torch.cuda.memory_allocated() if capturing else 0
        runner(tokens, targets, model.init_state(tokens.size(1)))
        if capturing and runner.graphs:  # the pool the graph keeps: not seen by a replay's peak
            run.held_mb = (torch.cuda.memory_allocated() - before) / 2**20
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()

    run.held_mb = 0.0
    return run


def bench_stacks(cells: list[str], sizes: list[int], dtypes: list[str], *, layers: int, batch: int, bptt: int,
                 repeats: int, warmup: int, device: torch.device) -> list[Record]:
    with full_fp32():
        return stack_records(cells, sizes, dtypes, layers=layers, batch=batch, bptt=bptt, repeats=repeats,
                             warmup=warmup, device=device)


def stack_records(cells: list[str], sizes: list[int], dtypes: list[str], *, layers: int, batch: int, bptt: int,
                  repeats: int, warmup: int, device: torch.device) -> list[Record]:
    records = []
    for hidden in sizes:
        for dtype_name in dtypes:
            compute_dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            x = torch.randn(bptt, batch, hidden, device=device, requires_grad=True)
            needed = {reference_cell(cell) for cell in cells}
            stacks = {(cell, "torch"): TorchStack(cell, layers, hidden) for cell in REFERENCES if cell in needed}
            stacks.update({(cell, "ours"): OurStack(cell, layers, hidden) for cell in with_baselines(cells)})
            runs = {key: stack_step(stack.to(device), x, compute_dtype, key[1] != "torch") for key, stack in stacks.items()}
            if device.type == "cuda" and "lstm" in cells:  # the LSTM's window in one launch each way
                runs["lstm", "ours+persistent"] = with_env("LMTRAIN_PERSISTENT", "1",
                                                           stack_step(stacks["lstm", "ours"], x, compute_dtype, True))
            medians = time_round_robin(runs, repeats, warmup, device)
            records += compared([
                Record("stack", cell, impl, layers, hidden, batch, bptt, dtype_name, device.type,
                       bptt * batch / medians[cell, impl], peak_memory_mb(run, device))
                for (cell, impl), run in runs.items()
            ])
    return records


def with_baselines(cells: list[str]) -> list[str]:
    """`cells`, each followed by the cell it extends (its module's EXTENDS: the mogrifier's and dglstm's lstm) where
    that is not asked for itself, so that the ratio to it has a denominator."""
    names = []
    for cell in cells:
        names += [cell] + [base for base in [getattr(get_cell(cell), "EXTENDS", None)] if base and base not in cells]
    return list(dict.fromkeys(names))


def compared(records: list[Record]) -> list[Record]:
    """Records of one benchmark, setting and dtype, each of ours given its reference's name and its
    tokens/s over the reference's and over our lstm's (where our lstm was timed)."""
    torch_rates = {reference_name(r.cell): r.tokens_per_s for r in records if r.impl == "torch"}
    our_lstm = next((r.tokens_per_s for r in records if (r.cell, r.impl) == ("lstm", "ours")), None)
    for r in records:
        if r.impl != "torch":
            r.reference = reference_name(r.cell)
            r.ratio_vs_reference = r.tokens_per_s / torch_rates[r.reference]
            r.ratio_vs_our_lstm = None if our_lstm is None else r.tokens_per_s / our_lstm
    return records


def bench_train_steps(sizes: list[int], dtypes: list[str], *, layers: int, batch: int, bptt: int, vocab: int,
                      repeats: int, warmup: int, device: torch.device,
                      note: Callable[[str], None] = lambda message: None) -> list[Record]:
    """The whole training step, ours (and on CUDA ours through a CUDA graph) against
    torch.nn.LSTM's; `note` hears of a CUDA graph capture that failed."""
    with full_fp32():
        return step_records(sizes, dtypes, layers=layers, batch=batch, bptt=bptt, vocab=vocab, repeats=repeats,
                            warmup=warmup, device=device, note=note)


def step_records(sizes: list[int], dtypes: list[str], *, layers: int, batch: int, bptt: int, vocab: int,
                 repeats: int, warmup: int, device: torch.device, note: Callable[[str], None]) -> list[Record]:
    records = []
    for hidden in sizes:
        for dtype_name in dtypes:
            compute_dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            tokens = torch.randint(0, vocab, (bptt, batch), device=device)
            targets = torch.randint(0, vocab, (bptt, batch), device=device)
            ours = LanguageModel(ModelConfig(layers=layers, embedding_size=hidden, hidden_size=hidden), vocab)
            reference = TorchLSTMLanguageModel(vocab, layers, hidden)
            runs = {
                "ours": timed_step(ours.to(device), tokens, targets, True, compute_dtype),
                "torch": timed_step(reference.to(device), tokens, targets, False, compute_dtype),
            }
            if device.type == "cuda":
                graphed = LanguageModel(ModelConfig(layers=layers, embedding_size=hidden, hidden_size=hidden), vocab)
                graphed.load_state_dict(ours.state_dict())
                runs["ours+graphs"] = graphed_timed_step(graphed.to(device), tokens, targets, compute_dtype, note)
            medians = time_round_robin(runs, repeats, warmup, device)
            records += compared([
                Record("step", "lstm", impl, layers, hidden, batch, bptt, dtype_name, device.type,
                       bptt * batch / medians[impl], peak_memory_mb(run, device) + getattr(run, "held_mb", 0.0))
                for impl, run in runs.items()
            ])
    return records


def as_dicts(records: list[Record]) -> list[dict]:
    return [asdict(r) for r in records]


def format_table(records: list[Record]) -> str:
    """A markdown table of the records; a torch row leaves the reference and the ratios blank."""
    lines = [
        "| what | cell | impl | layers × hidden | batch | bptt | dtype | tokens/s | peak MB | reference | ours / reference "
        "| ours / our lstm |",
        "|---|---|---|---|---|---|---|---:|---:|---|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r.what} | {r.cell} | {r.impl} | {r.layers} × {r.hidden_size} | {r.batch_size} | {r.bptt} | "
            f"{r.dtype} | {r.tokens_per_s:,.0f} | {r.peak_mem_mb:,.1f} | {r.reference or ''} | "
            f"{ratio(r.ratio_vs_reference)} | {ratio(r.ratio_vs_our_lstm)} |"
        )
    return "\n".join(lines)


def ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


