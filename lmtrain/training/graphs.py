"""CUDA graphs for training windows: capture one window's forward and backward once per BPTT
length, then replay it, so a step costs one graph launch instead of several launches per time step.

    window(x, y, state) -> (loss, new_state)     runs the forward and calls backward(); the caller's
                                                 function (lmtrain.training.loop), knowing nothing of graphs

    WindowRunner(window, params, ...)(x, y, state):
      eager:   grads set to None, then window(x, y, state)
      graphs:  x, y, state copied into static buffers; the captured graph of this length replayed;
               each parameter's .grad pointed at that graph's static gradient

Shapes are static within a graph, so there is one graph per window length. A fixed bptt gives two
(bptt and the epoch's remainder); the most recently used `capacity` graphs are kept (LRU), each
with its own memory pool (replayed in any order, so the pools cannot be shared). The runner
counts captures and replays, and `hit_note` says how often a window found its graph.

The optimizer step and clipping run eagerly after the replay, on the static gradients.

Capturing leaves the random numbers where an eager run would: the eager warm-ups before a capture
draw dropout masks from the CUDA generator, whose state is put back after them, so a resumed run
(which captures afresh) draws what the uninterrupted one drew.

Graphs are off (`graphs_for`, one note): on the CPU, with train.cuda_graphs = false, with
train.variable_bptt (20-30 distinct lengths and a new remainder each epoch: nearly every window
would capture anew, each capture costing two eager warm-ups, a synchronisation and more), and
with several processes (DDP meets none of PyTorch's conditions for capturing its backward). When
a capture fails (an operation that cannot be captured, a CPU synchronisation inside the window)
the window runs eagerly; a failed capture is reported once through `note` and never retried.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmtrain.config import TrainConfig
from lmtrain.model import held_scratch, selfcheck

State = list[tuple[Tensor, ...]]
Window = Callable[[Tensor, Tensor, State], tuple[Tensor, State]]

GRAPH_CAPACITY = 4  # captured window lengths kept at once (LRU); each holds a window's activations
WARMUP_RUNS = 2  # eager runs on a side stream before capture: compiles, cuBLAS workspaces, AccumulateGrad


@dataclass
class Captured:
    """One window length's graph and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    x: Tensor  # (T, B) inputs
    y: Tensor  # (T, B) targets
    state_in: State
    loss: Tensor  # () the window's loss
    state_out: State
    grads: list[Tensor | None]  # one per parameter, in params order
    # the recurrences' scratch buffers at capture: the graph writes to their addresses at every
    # replay, so it keeps them alive after a longer window has replaced them (model.held_scratch)
    buffers: list[Tensor] = field(default_factory=list)


def graphs_for(config: TrainConfig, device: torch.device, processes: int) -> tuple[bool, str | None]:
    """Whether training windows go through CUDA graphs, and the note that says why not where
    train.cuda_graphs asks for them on CUDA (see the module docstring); `processes`: the world size.

    It depends only on the config, the device type and the world size, which every rank shares, so
    every rank decides alike without asking the others."""
    if not config.cuda_graphs or device.type != "cuda":
        return False, None
    if processes > 1:
        return False, (f"CUDA graphs off: {processes} processes train through DDP, which lmtrain does not set up "
                       "for capture; running eagerly")
    if config.variable_bptt:
        return False, ("CUDA graphs off: train.variable_bptt draws a new window length most windows, and capturing "
                       "each costs more than its replays save; running eagerly")
    return True, None


class WindowRunner:
    """Runs training windows eagerly or through CUDA graphs (see the module docstring)."""

    def __init__(self, window: Window, params: list[torch.nn.Parameter], use_graphs: bool,
                 note: Callable[[str], None] = lambda message: None, capacity: int = GRAPH_CAPACITY):
        self.window = window
        self.params = params
        self.use_graphs = use_graphs
        self.note = note
        self.capacity = capacity
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.captures = 0  # graphs captured (a window whose length had none)
        self.replays = 0  # windows run through a graph, the capturing ones included

    def __call__(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, State]:
        """x, y (T, B) on the model's device; state: one tuple per layer -> (loss, new state).

        Afterwards each parameter's .grad holds this window's gradient."""
        if not self.graphs_apply(x):
            return self.eager(x, y, state)
        key = (tuple(x.shape), tuple(tuple(s.shape) for layer in state for s in layer))
        captured = self.graphs.get(key)
        if captured is None:
            try:
                captured = self.capture(x, y, state)
            except Exception as error:  # noqa: BLE001  whatever made capture fail, eager still works
                self.use_graphs = False
                self.graphs.clear()
                first_line = str(error).splitlines()[0] if str(error) else ""
                self.note(f"CUDA graphs off for this run: capturing a window failed ({type(error).__name__}: {first_line}); running eagerly")
                return self.eager(x, y, state)
            self.graphs[key] = captured
            self.captures += 1
            if len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)  # least recently used; its pool is freed with it
        self.graphs.move_to_end(key)
        self.replays += 1
        return self.replay(captured, x, y, state)

    def hit_note(self) -> str | None:
        """One line: how many windows went through a graph and how many of them found it captured
        already; None when none did."""
        if not self.replays:
            return None
        reused = self.replays - self.captures
        return (f"CUDA graphs: {self.replays:,} windows replayed, {self.captures:,} captures; "
                f"{reused / self.replays:.0%} found their graph captured")

    def graphs_apply(self, x: Tensor) -> bool:
        """Whether this window goes through a graph: asked for, not failed, and on CUDA."""
        return self.use_graphs and x.is_cuda

    def eager(self, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, State]:
        for p in self.params:
            p.grad = None
        return self.window(x, y, state)

    def capture(self, x: Tensor, y: Tensor, state: State) -> Captured:
        selfcheck.inject("cuda-graphs")
        static_x, static_y = x.clone(), y.clone()
        static_state = [tuple(s.detach().clone() for s in layer) for layer in state]
        # the warm-ups draw dropout masks: the CUDA generator is put back after them, so that a
        # capture leaves the random numbers as an eager run would (exact resume, which captures afresh)
        random_state = torch.cuda.get_rng_state(x.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.eager(static_x, static_y, static_state)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.set_rng_state(random_state, x.device)
        for p in self.params:
            p.grad = None  # so the captured backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, state_out = self.window(static_x, static_y, static_state)
        grads = [p.grad for p in self.params]
        state_out = [tuple(s.detach() for s in layer) for layer in state_out]
        return Captured(graph, static_x, static_y, static_state, loss.detach(), state_out, grads, held_scratch())

    def replay(self, captured: Captured, x: Tensor, y: Tensor, state: State) -> tuple[Tensor, State]:
        captured.x.copy_(x)
        captured.y.copy_(y)
        for static_layer, layer in zip(captured.state_in, state):
            for static, s in zip(static_layer, layer):
                static.copy_(s)
        captured.graph.replay()
        for p, grad in zip(self.params, captured.grads):
            p.grad = grad
        return captured.loss, captured.state_out
