"""Training windows through lmtrain.training.graphs: the eager fallback on the CPU (what CI can run) and,
on a GPU, capture and replay against eager."""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext

import pytest
import torch
from test_determinism import SETTINGS, run_once
from helpers import needs_cuda, write_corpus

from lmtrain.config import ModelConfig, TrainConfig, load_config
from lmtrain.model.kernels import fused
from lmtrain.model.language_model import LanguageModel
from lmtrain.progress import QuietProgress
from lmtrain.training import loop, prepare_run, train
from lmtrain.training.distributed import WindowForward
from lmtrain.training.graphs import Captured, WindowRunner, graphs_for
from lmtrain.training.loop import train_window

on_gpu = needs_cuda("CUDA graphs capture only GPU work")


def small_model(device="cpu", dropout=0.0, seed=0, cell="lstm"):
    torch.manual_seed(seed)
    config = ModelConfig(layers=2, embedding_size=8, hidden_size=8, dropout=dropout, cell=cell)
    return LanguageModel(config, vocab_size=23).to(device).train()


def windows(lengths, batch=3, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 23, (n, batch), generator=g).to(device), torch.randint(0, 23, (n, batch), generator=g).to(device))
            for n in lengths]


def run_windows(runner, model, data, batch=3):
    """Loss, final state and gradients after each window, the state carried across windows."""
    state, results = model.init_state(batch), []
    for x, y in data:
        loss, state = runner(x, y, [tuple(s.detach() for s in layer) for layer in state])
        results.append((loss.item(), [s.detach().clone() for layer in state for s in layer],
                        [p.grad.detach().clone() for p in model.parameters()]))
    return results


def test_cpu_falls_back_to_eager_and_gradients_are_not_accumulated():
    model = small_model()
    data = windows([5, 5, 3])
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()), True)
    results = run_windows(runner, model, data)
    assert runner.graphs == {}  # nothing captured on the CPU
    again = run_windows(runner, model, data[:1])  # the first window alone: the same gradient, not twice it
    for ours, ref in zip(again[0][2], results[0][2]):
        assert torch.equal(ours, ref)
    assert results[0][0] != results[1][0]


def test_failed_capture_is_noted_once_and_training_goes_on_eagerly(monkeypatch):
    model = small_model()
    notes, captures = [], []
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()),
                          True, notes.append)

    def failing_capture(x, y, state):
        captures.append(x.shape)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(runner, "graphs_apply", lambda x: runner.use_graphs)  # as if on CUDA
    monkeypatch.setattr(runner, "capture", failing_capture)
    eager = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()), False)
    data = windows([4, 4, 6])
    results = run_windows(runner, model, data)
    expected = run_windows(eager, model, data)
    assert len(captures) == 1 and not runner.use_graphs
    assert notes == ["CUDA graphs off for this run: capturing a window failed (RuntimeError: operation not permitted "
                     "when stream is capturing); running eagerly"]
    for (loss, state, grads), (loss_ref, state_ref, grads_ref) in zip(results, expected):
        assert loss == loss_ref
        assert all(torch.equal(a, b) for a, b in zip(state + grads, state_ref + grads_ref))


def test_training_is_identical_with_the_key_on_or_off_on_cpu(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", sizes=(60, 10, 10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        on = run_once(corpus, tmp_path / "on", monkeypatch, extra=["train.cuda_graphs=true", "train.epochs=1"])
        off = run_once(corpus, tmp_path / "off", monkeypatch, extra=["train.cuda_graphs=false", "train.epochs=1"])
    finally:
        torch.set_num_threads(threads)
    assert on == off and b'"kind": "epoch"' in on


def test_graph_cache_keeps_the_most_recently_used_lengths(monkeypatch):
    """The LRU bookkeeping without a GPU: capture stubbed (an eager run and a graph whose replay
    does nothing), room for two lengths. 6, 4 captured; 6 hits; 3 evicts 4 (6 was used later);
    6 hits; 4 is captured again and evicts 3."""
    model = small_model()
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()),
                          True, capacity=2)
    captured = []

    class NoGraph:
        def replay(self):
            pass

    def stub_capture(x, y, state):
        captured.append(x.size(0))
        loss, state_out = runner.eager(x, y, state)
        return Captured(NoGraph(), x.clone(), y.clone(), [tuple(s.clone() for s in layer) for layer in state],
                        loss.detach(), [tuple(s.detach() for s in layer) for layer in state_out],
                        [p.grad for p in model.parameters()])

    monkeypatch.setattr(runner, "graphs_apply", lambda x: runner.use_graphs)  # as if on CUDA
    monkeypatch.setattr(runner, "capture", stub_capture)
    run_windows(runner, model, windows([6, 4, 6, 3, 6, 4]))
    assert captured == [6, 4, 3, 4]
    assert [key[0][0] for key in runner.graphs] == [6, 4]  # least recently used first


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's calls in WindowRunner.capture, without a GPU: streams do nothing, the graph's
    capture runs the window eagerly and its replay does nothing, and the CUDA generator is the CPU's
    (which the CPU windows' dropout draws from). Yields the calls made, with the generator's state
    when the capture began. Windows go through `capture` as if on CUDA."""
    calls = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            pass

    @contextmanager
    def graph(g):
        calls.append(("capture", torch.get_rng_state()))
        yield

    def get_rng_state(device):
        calls.append(("get", device))
        return torch.get_rng_state()

    def set_rng_state(state, device):
        calls.append(("set", device))
        torch.set_rng_state(state)

    for name, value in {"Stream": Stream, "current_stream": Stream, "stream": lambda side: nullcontext(), "CUDAGraph": Graph,
                        "graph": graph, "get_rng_state": get_rng_state, "set_rng_state": set_rng_state}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(WindowRunner, "graphs_apply", lambda self, x: self.use_graphs)
    return calls


def test_capture_leaves_the_random_numbers_as_an_eager_window_would(fake_cuda):
    """With dropout the two warm-ups draw masks; the generator is put back before the capture, so the
    captured window draws what one eager window from the same state draws, and leaves the generator
    where that window leaves it (a resumed run, which captures afresh, goes on as the uninterrupted one)."""
    model = small_model(dropout=0.5)
    (x, y), = windows([6])
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()), True)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    loss, _ = runner(x, y, model.init_state(3))
    after = torch.get_rng_state()
    assert len(runner.graphs) == 1
    assert [call[0] for call in fake_cuda] == ["get", "set", "capture"] and fake_cuda[0][1] == fake_cuda[1][1] == x.device
    assert torch.equal(fake_cuda[2][1], before)
    torch.set_rng_state(before)
    loss_eager, _ = runner.eager(x, y, model.init_state(3))
    assert loss.item() == loss_eager.item() and torch.equal(torch.get_rng_state(), after)


def test_a_graph_keeps_the_scratch_buffers_it_was_captured_with(fake_cuda, monkeypatch):
    """A longer window replaces the recurrences' scratch buffers with larger ones; the graph of the
    shorter window still writes to the old ones at each replay, so it holds them."""
    monkeypatch.setenv("LMTRAIN_KERNELS", "0")  # the generic engine on the CPU: it takes fused.scratch's buffers
    model = small_model(cell="gru")
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()), True)
    fused.clear_caches()
    short, long = windows([4, 6])
    runner(*short, model.init_state(3))
    first = next(iter(runner.graphs.values()))
    held = {name: buffer for (name, *_), buffer in fused._SCRATCH.items()}
    runner(*long, model.init_state(3))
    for name in ("xg", "dxg"):
        now = [buffer for (n, *_), buffer in fused._SCRATCH.items() if n == name]
        assert len(now) == 1 and now[0].size(0) == 6 and now[0] is not held[name]
        assert any(buffer is held[name] for buffer in first.buffers)


def test_hits_are_counted_and_noted(monkeypatch):
    """The LRU test's windows: 6 replays, 4 of them after a capture."""
    model = small_model()
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()),
                          True, capacity=2)
    assert runner.hit_note() is None
    monkeypatch.setattr(runner, "graphs_apply", lambda x: runner.use_graphs)
    monkeypatch.setattr(runner, "capture", lambda x, y, state: Captured(None, x, y, state, torch.zeros(()), state, []))
    monkeypatch.setattr(runner, "replay", lambda captured, x, y, state: (captured.loss, state))
    for x, y in windows([6, 4, 6, 3, 6, 4]):
        runner(x, y, [])
    assert (runner.captures, runner.replays) == (4, 6)
    assert runner.hit_note() == "CUDA graphs: 6 windows replayed, 4 captures; 33% found their graph captured"


@pytest.mark.parametrize("settings, processes, expected", [
    ({}, 1, (True, None)),
    ({"cuda_graphs": False}, 1, (False, None)),
    ({"variable_bptt": True}, 1, (False, "CUDA graphs off: train.variable_bptt draws a new window length most windows, "
                                        "and capturing each costs more than its replays save; running eagerly")),
    ({}, 2, (False, "CUDA graphs off: 2 processes train through DDP, which lmtrain does not set up for capture; running eagerly")),
    ({"variable_bptt": True}, 4, (False, "CUDA graphs off: 4 processes train through DDP, which lmtrain does not set up for "
                                         "capture; running eagerly")),
])
def test_when_graphs_are_used(settings, processes, expected):
    assert graphs_for(TrainConfig(**settings), torch.device("cuda"), processes) == expected
    assert graphs_for(TrainConfig(**settings), torch.device("cpu"), processes) == (False, None)  # never a note on the CPU


class Notes(QuietProgress):
    def __init__(self):
        self.notes = []

    def note(self, message):
        self.notes.append(message)


@pytest.mark.parametrize("variable", [True, False])
def test_training_notes_why_graphs_are_off_once_or_how_often_they_were_reused(variable, fake_cuda, tmp_path, monkeypatch):
    """train() on the CPU as if on CUDA (graphs_for told CUDA, capture stubbed): variable BPTT turns
    graphs off with one note and captures nothing; fixed BPTT captures its two lengths (bptt and the
    remainder) and ends with the hit note."""
    asked = []

    def as_if_on_cuda(config, device, processes):
        asked.append(processes)
        return graphs_for(config, torch.device("cuda"), processes)

    monkeypatch.setattr(loop, "graphs_for", as_if_on_cuda)
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus", sizes=(60, 10, 10))
    config = load_config(None, [*SETTINGS, f"train.variable_bptt={str(variable).lower()}", "train.epochs=1"])
    model, config, data, info = prepare_run(corpus, config, tmp_path / "run", force=False, default_run_dir=None, say=lambda line: None)
    info.pop("run_dir")
    progress = Notes()
    record = train(model, config, data, tmp_path / "run", info, progress=progress)
    assert asked == [1]
    if variable:
        assert progress.notes == [graphs_for(config.train, torch.device("cuda"), 1)[1]]
        assert not any(call[0] == "capture" for call in fake_cuda)
    else:
        assert len(progress.notes) == 1
        hits = re.fullmatch(r"CUDA graphs: (\d+) windows replayed, 2 captures; \d+% found their graph captured", progress.notes[0])
        assert hits and int(hits[1]) == record["step"]


@on_gpu
def test_replayed_windows_match_eager_across_lengths_and_evictions():
    """Four windows of three lengths with room for two graphs: the third length evicts the first,
    which is captured again when it comes back. Dropout off, so eager and graphs see the same numbers."""
    data = windows([6, 4, 6, 3, 6], device="cuda")
    model = small_model("cuda")
    runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s), list(model.parameters()),
                          True, capacity=2)
    replayed = run_windows(runner, model, data)
    assert runner.use_graphs and len(runner.graphs) == 2
    model_eager = small_model("cuda")
    eager = WindowRunner(lambda x, y, s: train_window(WindowForward(model_eager), TrainConfig(), None, x, y, s),
                         list(model_eager.parameters()), False)
    for (loss, state, grads), (loss_ref, state_ref, grads_ref) in zip(replayed, run_windows(eager, model_eager, data)):
        assert abs(loss - loss_ref) <= 1e-5
        for a, b in zip(state + grads, state_ref + grads_ref):
            assert (a - b).abs().max().item() <= 1e-5


@on_gpu
def test_training_runs_through_graphs_on_cuda(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", sizes=(60, 10, 10))
    metrics = run_once(corpus, tmp_path / "gpu", monkeypatch, extra=["train.device=cuda", "train.epochs=1"])
    assert b'"kind": "epoch"' in metrics


def test_an_injected_capture_failure_is_noted_and_the_run_equals_the_eager_one(fake_cuda, monkeypatch):
    """LMTRAIN_FAULT=cuda-graphs makes capture raise: noted once, graphs off, every window eager."""
    monkeypatch.setenv("LMTRAIN_FAULT", "cuda-graphs")
    data = windows([5, 5, 4])
    results = {}
    for graphs in (True, False):
        model, notes = small_model(seed=2), []
        runner = WindowRunner(lambda x, y, s: train_window(WindowForward(model), TrainConfig(), None, x, y, s),
                              list(model.parameters()), graphs, notes.append)
        results[graphs] = run_windows(runner, model, data)
        if graphs:
            assert len(notes) == 1 and "capturing a window failed (InjectedFault" in notes[0]
            assert runner.graphs == {} and not runner.use_graphs and fake_cuda == []
    for (loss, state, grads), (loss_off, state_off, grads_off) in zip(results[True], results[False]):
        assert loss == loss_off and all(torch.equal(a, b) for a, b in zip(state + grads, state_off + grads_off))
