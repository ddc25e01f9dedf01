"""Training windows through lmtrain.training.graphs: the eager fallback on the CPU (what CI can run) and,
on a GPU, capture and replay against eager."""

from __future__ import annotations

import torch
from test_determinism import run_once
from helpers import needs_cuda, write_corpus

from lmtrain.config import ModelConfig, TrainConfig
from lmtrain.model.language_model import LanguageModel
from lmtrain.training.distributed import WindowForward
from lmtrain.training.graphs import Captured, WindowRunner
from lmtrain.training.loop import train_window

on_gpu = needs_cuda("CUDA graphs capture only GPU work")


def small_model(device="cpu", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(layers=2, embedding_size=8, hidden_size=8, dropout=dropout)
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
