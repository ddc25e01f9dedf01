"""Dynamic evaluation and the continuous cache: what they compute, and that no token is read
before it is scored."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import write_corpus
from typer.testing import CliRunner

from lmtrain.cli import app
from lmtrain.config import load_config
from lmtrain.evaluation.cache import cache_probs, mix, tune
from lmtrain.evaluation.dynamic import DynamicEval, DynamicSettings, gradient_stats
from lmtrain.evaluation.evaluate import evaluate_stream, total_nll
from lmtrain.evaluation.stream import score_stream
from lmtrain.model.saved import load_run
from lmtrain.training.loop import train
from lmtrain.training.setup import prepare_run

SETTINGS = ["tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=1", "model.embedding_size=16",
            "model.hidden_size=16", "train.batch_size=4", "train.bptt=8", "train.epochs=2", "train.lr=5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run: (run directory, its data, the loaded model)."""
    root = tmp_path_factory.mktemp("adaptive")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTRAIN_CACHE", str(root / "cache"))
        config = load_config(None, SETTINGS)
        model, config, data, info = prepare_run(write_corpus(root / "corpus", sizes=(150, 30, 30)), config, root / "run", force=False,
                                        default_run_dir=None, say=lambda line: None)
        info.pop("run_dir")
        train(model, config, data, root / "run", info)
        yield root / "run", data, load_run(root / "run", torch.device("cpu")).model
    torch.set_num_threads(threads)


def test_cache_by_hand():
    log_probs = torch.full((4,), math.log(0.1), dtype=torch.float64)
    targets = torch.tensor([5, 5, 7, 5])
    hidden = torch.ones(4, 3)  # equal outputs: the pointer weighs its history uniformly
    p = cache_probs(targets, hidden, window=10, theta=1.0)
    assert p.tolist() == pytest.approx([0.0, 1.0, 0.0, 2 / 3])  # position 3: two of its three predecessors were 5
    assert mix(log_probs, p, 0.5).exp().tolist() == pytest.approx([0.1, 0.55, 0.05, 0.05 + 1 / 3])
    assert cache_probs(targets, hidden, window=1, theta=1.0).tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    sharp = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # position 2 looks like 0, not like 1
    assert cache_probs(torch.tensor([3, 4, 3]), sharp, 10, theta=50.0)[2] == pytest.approx(1.0)


def test_cache_never_reads_ahead():
    torch.manual_seed(0)
    targets, hidden = torch.randint(0, 5, (300,)), torch.randn(300, 8)
    changed = targets.clone()
    changed[150:] = (changed[150:] + 1) % 5
    a, b = cache_probs(targets, hidden, 50, 0.5), cache_probs(changed, hidden, 50, 0.5)
    assert torch.equal(a[:150], b[:150])


def test_tune_finds_the_grid_minimum():
    torch.manual_seed(1)
    targets = torch.randint(0, 4, (200,))
    log_probs = torch.full((200,), math.log(0.25), dtype=torch.float64)
    hidden = torch.nn.functional.one_hot(targets, 4).float()  # the same word, the same output: the cache helps
    theta, lam, nll = tune(log_probs, targets, hidden, 100, (0.5, 5.0), (0.0, 0.5, 0.9))
    assert (theta, lam) == (5.0, 0.9) and nll < -log_probs.sum().item()


def test_stream_scores_match_batched_evaluation(run):
    _, data, model = run
    log_probs, _, _ = score_stream(model, data["test"].tokens, 8)
    nll, n = total_nll(model, data["test"].tokens, 1, 8)
    assert n == log_probs.numel() and -log_probs.sum().item() == pytest.approx(nll, rel=1e-6)


def test_dynamic_evaluation_scores_before_it_learns(run):
    _, data, model = run
    settings = DynamicSettings(lr=1e-2, decay=1e-3, bptt=5, stats_batch_size=4, stats_batches=20)
    ms = gradient_stats(model, data["train"].tokens, settings)
    trained = [p.detach().clone() for p in model.parameters()]
    tokens = data["test"].tokens.copy()
    dynamic = DynamicEval(model, ms, settings)
    first, _, _ = score_stream(model, tokens, 5, dynamic)
    dynamic.restore()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    changed = tokens.copy()
    changed[52:] = (changed[52:] + 1) % 80  # the text from token 52 on differs
    second, _, _ = score_stream(model, changed, 5, DynamicEval(model, ms, settings))
    dynamic.restore()
    assert torch.equal(first[:52], second[:52])  # nothing before it saw it, updates included
    static, _, _ = score_stream(model, tokens, 5)
    assert torch.equal(first[:5], static[:5]) and not torch.equal(first[5:], static[5:])  # learning starts after window 1


def test_evaluate_stream_restores_the_weights(run):
    _, data, model = run
    settings = DynamicSettings(stats_batch_size=4, stats_batches=5)
    dynamic = DynamicEval(model, gradient_stats(model, data["train"].tokens, settings), settings)
    before = [p.detach().clone() for p in model.parameters()]
    result = evaluate_stream(model, data["valid"], 5, dynamic)
    assert math.isfinite(result["ppl"]) and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_cli_dynamic_and_cache(run):
    run_dir = run[0]
    cli = CliRunner()
    plain = json.loads(cli.invoke(app, ["evaluate", str(run_dir), "--batch-size", "1", "--json"]).stdout)
    both = cli.invoke(app, ["evaluate", str(run_dir), "--json", "--dynamic", "--stats-batches", "5", "--tune-cache",
                            "--cache-window", "100"])
    assert both.exit_code == 0, both.output
    report = json.loads(both.stdout)
    assert report["tokens"] == plain["tokens"] and math.isfinite(report["ppl"])
    assert report["dynamic"]["stats_batches"] == 5 and report["cache"]["window"] == 100
    bad = cli.invoke(app, ["evaluate", str(run_dir), "--cache", "--batch-size", "4"])
    assert bad.exit_code == 2 and "--batch-size must be 1" in bad.stderr


def test_dynamic_update_by_hand(run):
    """From the trained weights the first update is θ − lr · g / (MS + eps): the pull is still 0."""
    _, data, model = run
    settings = DynamicSettings(lr=1e-3, decay=0.5, eps=1e-4, stats_batch_size=4, stats_batches=3)
    ms = gradient_stats(model, data["train"].tokens, settings)
    dynamic = DynamicEval(model, ms, settings)
    x = torch.as_tensor(data["test"].tokens[:6].astype("int64")).view(-1, 1)
    loss = torch.nn.functional.cross_entropy(model(x[:-1], model.init_state(1))[0].view(-1, model.vocab_size), x[1:].view(-1))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    logits, _ = model(x[:-1], model.init_state(1))
    dynamic(torch.nn.functional.cross_entropy(logits.view(-1, model.vocab_size), x[1:].view(-1)))
    for p, b, g, m in zip(model.parameters(), before, grads, ms):
        assert torch.allclose(p, b - 1e-3 * g / (m + 1e-4), atol=1e-6)
    dynamic(torch.zeros((), requires_grad=True) * sum(p.sum() for p in model.parameters()))  # no gradient: only the pull
    for p, b, g, m, pull in zip(model.parameters(), before, grads, ms, dynamic.pull):
        moved = b - 1e-3 * g / (m + 1e-4)
        assert torch.allclose(p, moved + pull * (b - moved), atol=1e-6)
    dynamic.restore()
