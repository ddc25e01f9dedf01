"""Metrics on hand-computable cases, the learning-rate schedules, and sampling."""

import math
import os

import numpy as np
import pytest
import torch

from lmtrain.config import ModelConfig, TrainConfig
from lmtrain.evaluation.evaluate import combine, metrics, total_nll
from lmtrain.generation.sampler import SampleSettings, Sampler, StreamRandom, pick, sample
from lmtrain.generation.stepper import available_precisions
from lmtrain.model.language_model import LanguageModel
from lmtrain.text.tokenizer import EOS_ID
from lmtrain.training.schedule import epoch_lr


def uniform_model(vocab_size):
    """A model whose logits are all equal: every token has probability 1 / vocab_size."""
    model = LanguageModel(ModelConfig(layers=1, embedding_size=4, hidden_size=4), vocab_size)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    return model


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_uniform_model_perplexity_is_vocab_size(batch_size):
    tokens = np.random.default_rng(0).integers(0, 50, size=101)
    nll_sum, n = total_nll(uniform_model(50), tokens, batch_size, bptt=8)
    assert n == 101  # every token scored once, whatever the batch layout
    assert math.isclose(math.exp(nll_sum / n), 50, rel_tol=1e-6)


def test_metrics_from_known_counts():
    m = metrics(nll_sum=100 * math.log(8), n_tokens=100, n_words=50, n_bytes=300)
    assert math.isclose(m["ppl"], 8)
    assert math.isclose(m["word_ppl"], 64)  # two tokens per word
    assert math.isclose(m["bits_per_byte"], 100 * 3 / 300)
    both = combine([m, metrics(100 * math.log(2), 100, 100, 100)])
    assert both["tokens"] == 200 and math.isclose(both["ppl"], 4)  # token-weighted, not averaged
    assert m["bits_per_char"] is None and both["bits_per_char"] is None  # a count not known stays unknown
    chars = metrics(nll_sum=100 * math.log(2), n_tokens=50, n_words=10, n_bytes=200, n_chars=100)
    assert math.isclose(chars["bits_per_byte"], 0.5) and math.isclose(chars["bits_per_char"], 1.0)



def test_windows_carry_the_state_exactly():
    """Batch 1 in windows of 5 equals one pass over the whole text from `<eos>`."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=6, hidden_size=6), 20).double().eval()
    tokens = np.random.default_rng(1).integers(2, 20, size=57)
    windowed, n = total_nll(model, tokens, 1, 5)
    inputs = torch.tensor([EOS_ID] + tokens[:-1].tolist()).unsqueeze(1)
    logits, _ = model(inputs, model.init_state(1))
    whole = torch.nn.functional.cross_entropy(logits.squeeze(1), torch.from_numpy(tokens), reduction="sum").item()
    assert n == 57 and math.isclose(windowed, whole, rel_tol=1e-12)


def test_epoch_schedule_is_zaremba_decay():
    c = TrainConfig(lr=1.0, lr_schedule="epoch", lr_decay=2.0, lr_decay_start=4)
    assert [epoch_lr(c, e, 1.0) for e in range(1, 8)] == [1, 1, 1, 1, 0.5, 0.25, 0.125]
    plateau = TrainConfig(lr=1.0, lr_schedule="plateau")
    assert epoch_lr(plateau, 3, 0.25) == 0.25


def test_pick_respects_top_k_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draw = lambda u, k=0, p=1.0: pick(logits, 1.0, k, p, torch.tensor([u])).item()
    assert pick(logits, 0.0, 0, 1.0, None).item() == 0
    # inverse CDF: cumulative 0.5, 0.8, 0.95, 1.0
    assert [draw(u) for u in (0.0, 0.49, 0.501, 0.79, 0.801, 0.94, 0.951, 0.999)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [draw(u, k=2) for u in (0.0, 0.62, 0.63, 0.999)] == [0, 0, 1, 1]  # 0.5 / 0.8 = 0.625
    assert {draw(u / 100, p=0.75) for u in range(100)} == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are cut
    rows = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))  # probability-0 tokens are never drawn
    assert pick(rows, 1.0, 0, 1.0, torch.tensor([0.0, 0.0])).tolist() == [0, 2]
    # the draws follow the distribution
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(pick(logits.expand(20000, -1), 1.0, 0, 1.0, torch.rand(20000, generator=g)), minlength=4)
    assert torch.allclose(counts / 20000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)


def test_sampling_is_seeded_and_batch_equals_single():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=8, hidden_size=8), 30)
    run = lambda seed, n, **kw: torch.stack(list(sample(model, [3, 4], SampleSettings(300, n, 1.0, seed=seed, **kw))), 1)
    assert torch.equal(run(1, 1), run(1, 1))
    assert not torch.equal(run(1, 1), run(2, 1))
    for precision in available_precisions(torch.device("cpu")):
        batch = run(5, 4, precision=precision)  # (4, 300): more than one chunk of uniforms
        singles = torch.cat([run(5 + i, 1, precision=precision) for i in range(4)])
        assert torch.equal(batch, singles), precision  # sample i of a batch is the single sample seeded 5 + i
    greedy = lambda n: torch.stack(list(sample(model, [3, 4], SampleSettings(6, n, 0.0))), 1)
    assert torch.equal(greedy(3), greedy(1).expand(3, -1))  # one primed state shared by all samples


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc (Linux)")
def test_generation_memory_stays_flat_in_the_generated_length():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=32, hidden_size=32), 100)
    sampler = Sampler(model, "fp32")
    sampler.feed([EOS_ID])
    random = StreamRandom(0, 1)
    held = lambda: sum(t.numel() for layer in sampler.state for t in layer) + sampler.last.numel()
    for _ in sampler.draw(SampleSettings(300), random):  # warm up allocator caches
        pass
    before, before_held = resident_mb(), held()
    for _ in sampler.draw(SampleSettings(6000), random):
        pass
    assert held() == before_held  # the state is the same size after 300 or 6,300 tokens
    assert resident_mb() - before < 8, "memory grew with the generated length"


def test_the_compiled_draw_agrees_with_the_python_one():
    from lmtrain.model.kernels.build import cpu_ops

    if cpu_ops() is None:
        pytest.skip("the compiled kernels are not built on this machine")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 300, generator=g) * 3
    uniforms = torch.rand(4000, generator=g)
    compiled = pick(logits, 0.7, 0, 1.0, uniforms)  # no top-k / top-p: the compiled pass
    cumulative = (logits / 0.7).softmax(-1).cumsum(-1)
    python = torch.searchsorted(cumulative, (uniforms.view(-1, 1) * cumulative[:, -1:]), right=True).squeeze(1)
    assert (compiled != python).sum() <= 2  # the two sum in different orders: a draw on a boundary may differ
