"""Attention over past states (model.attention_window, lmtrain/model/attention.py): the batched fast
path against the per-step plain-autograd reference in float64 (outputs, new memory, every
gradient), gradcheck with memory in and out, windows in turn as one long window, the empty slots
at the start, K = 0 as the model without it, the model's shapes and state, generation's steps and
flat memory, exact resume, the config errors and a CLI train/evaluate/generate run."""

from __future__ import annotations

import copy
import json
import math
import shutil
import tomllib

import pytest
import torch
from helpers import TINY_WORD, assert_config_refused, assert_one_error, cli, evaluate_and_generate, needs_cuda, ok, private_cache_one_thread, sets, write_small_corpus

from lmtrain.checkpoint import load_checkpoint, save_checkpoint
from lmtrain.config import Config, ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.generation.sampler import Sampler
from lmtrain.generation.stepper import Stepper
from lmtrain.model import LanguageModel, count_parameters, load_run, model_shapes, state_widths
from lmtrain.model.attention import attend, reference, shapes
from lmtrain.training.preflight import parameter_count, training_bytes

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def isolated(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


def inputs(window, steps=6, batch=3, hidden=6, filled="mixed", seed=0):
    """y (T, B, H), the memory (keys, values, filled) and the five weights; all but filled leaves.
    filled "mixed": stream 0 empty, stream 1 its newer half held, the others all held."""
    g = torch.Generator().manual_seed(seed)
    d = hidden // 2
    r = lambda *shape, scale=0.7: (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_()  # noqa: E731
    held = torch.ones(batch, window, dtype=F64)
    if filled == "mixed":
        held[0] = 0
        held[1, : window - window // 2] = 0
    elif filled == "empty":
        held.zero_()
    memory = (r(batch, window * d), r(batch, window * d), held)
    weights = (r(d, d), r(d, d), r(d), r(hidden, d), r(hidden, d))
    return r(steps, batch, hidden, scale=1.0), memory, weights


def outputs_and_grads(run, y, memory, weights, seed=1):
    """h*, the new memory and the gradient of a random weighting of h*, keys and values at y, the
    memory's keys and values and every weight (zeros where it does not reach)."""
    out, new = run(y, memory, *weights)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (out, new[0], new[1]))
    leaves = [y, memory[0], memory[1], *weights]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # the reference reads no empty slot: None
    return [out, *new, *(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves))]


def worst(got, want):
    assert len(got) == len(want)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(got, want))
    return max(((a - b).abs().max() / max(1.0, b.abs().max().item())).item() for a, b in zip(got, want))


@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("window", [1, 3, 9])
@pytest.mark.parametrize("filled", ["mixed", "empty", "full"])
def test_the_fast_path_computes_what_the_reference_computes(window, steps, filled):
    y, memory, weights = inputs(window, steps=steps, filled=filled)
    got, want = outputs_and_grads(attend, y, memory, weights), outputs_and_grads(reference, y, memory, weights)
    assert worst(got, want) <= 1e-12
    d_y, _, _, d_w_y, d_w_h, d_w, d_w_r, d_w_x = got[4:]
    assert d_y.abs().max() > 0 and d_w_x.abs().max() > 0
    if filled != "empty" or steps > 1:  # some position reads a slot
        assert d_w_r.abs().max() > 0
    if window > 1 and (filled != "empty" or steps > 2):  # some position reads two (a softmax over one is constant)
        assert all(g.abs().max() > 0 for g in (d_w_y, d_w_h, d_w))


@pytest.mark.parametrize("filled", ["mixed", "full"])
def test_gradcheck_with_memory_in_and_out(filled):
    y, (keys, values, held), weights = inputs(2, steps=3, batch=2, hidden=4, filled=filled, seed=2)

    def run(y, keys, values, *weights):
        out, new = attend(y, (keys, values, held), *weights)
        return out, new[0], new[1]

    assert torch.autograd.gradcheck(run, (y, keys, values, *weights))


@pytest.mark.parametrize("window", [2, 4])
def test_windows_in_turn_are_one_long_window(window):
    """Three windows, each from the memory the one before left: the whole sequence's h*, final
    memory and gradients."""
    y, memory, weights = inputs(window, steps=9, filled="empty", seed=3)

    def in_turn(y, memory, *weights):
        outs = []
        for part in (y[:1], y[1:6], y[6:]):
            out, memory = attend(part, memory, *weights)
            outs.append(out)
        return torch.cat(outs), memory

    assert worst(outputs_and_grads(in_turn, y, memory, weights), outputs_and_grads(attend, y, memory, weights)) <= 1e-14


def test_empty_slots_are_not_read_and_fill_from_the_newest():
    """At the start nothing is held: the first h* is tanh(W_x v_0), what sits in an empty slot changes
    nothing, and after T < K outputs the memory holds them in its last T slots."""
    window, steps = 5, 3
    y, (keys, values, _), weights = inputs(window, steps=steps, filled="empty", seed=4)
    empty = torch.zeros(3, window, dtype=F64)
    with torch.no_grad():
        out, (new_keys, new_values, new_filled) = attend(y, (keys, values, empty), *weights)
        other, _ = attend(y, (keys * 100 + 7, values * -50, empty), *weights)
        assert torch.equal(out, other)
        assert torch.allclose(out[0], torch.tanh(y[0, :, 3:] @ weights[4].t()), atol=1e-15)
        assert torch.equal(new_filled, torch.tensor([[0.0] * (window - steps) + [1.0] * steps] * 3, dtype=F64))
        held_keys = new_keys.view(3, window, 3)[:, window - steps:]
        assert torch.equal(held_keys, y[:, :, :3].transpose(0, 1))
        assert torch.equal(new_values.view(3, window, 3)[:, window - steps:], y[:, :, 3:].transpose(0, 1))


def test_each_position_reads_only_the_k_outputs_before_it():
    window = 3
    y, memory, weights = inputs(window, steps=8, filled="full", seed=5)
    with torch.no_grad():
        out, _ = attend(y, memory, *weights)
        later = y.clone()
        later[4] += 1.0  # position 4 changes h*_4 .. h*_7 (it is in their K = 3 slots) and no earlier one
        moved, _ = attend(later, memory, *weights)
        assert torch.equal(moved[:4], out[:4]) and (moved[4:] - out[4:]).abs().amin(dim=(1, 2)).max() > 0
        first = y.clone()
        first[0] += 1.0  # out of every slot from position 4 on
        moved, _ = attend(first, memory, *weights)
        assert torch.equal(moved[4:], out[4:]) and (moved[:4] - out[:4]).abs().max() > 1e-3


def config(**changes) -> ModelConfig:
    return ModelConfig(**{"layers": 2, "embedding_size": 6, "hidden_size": 8, "attention_window": 3, **changes})


def test_k_0_is_the_model_without_attention():
    torch.manual_seed(0)
    plain = LanguageModel(ModelConfig(layers=2, embedding_size=6, hidden_size=8), 11).eval()
    torch.manual_seed(0)
    off = LanguageModel(config(attention_window=0), 11).eval()
    assert off.attention is None and len(off.init_state(2)) == 2
    assert list(off.state_dict()) == list(plain.state_dict())
    assert state_widths(config(attention_window=0)) == state_widths(ModelConfig(layers=2, embedding_size=6, hidden_size=8))
    tokens = torch.randint(0, 11, (5, 2))
    with torch.no_grad():
        assert torch.equal(off(tokens, off.init_state(2))[0], plain(tokens, plain.init_state(2))[0])


@pytest.mark.parametrize("cell, tie, grid", [("lstm", False, ""), ("lstm", True, ""), ("qrnn", False, ""), ("gru,dglstm", True, ""),
                                             ("lstm", False, "grid"), ("lstm", True, "tied grid")])
def test_the_models_shapes_state_and_count(cell, tie, grid):
    """model_shapes, state_widths and parameter_count, computed from the config, are the model's."""
    stacked = {"stack": "grid", "grid_tied": grid == "tied grid"} if grid else {}
    c = config(cell=cell, tie_weights=tie, embedding_size=6 if tie or grid else 5,
               hidden_size=6 if "dglstm" in cell or grid else 8, **stacked)
    model = LanguageModel(c, 11)
    assert list(model_shapes(c, 11).items()) == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    d = c.layer_sizes[-1] // 2
    assert {k: tuple(v.shape) for k, v in model.attention.state_dict().items()} == shapes(c.layer_sizes[-1])
    state = model.init_state(4)
    assert [[tuple(t.shape) for t in s] for s in state] == [[(4, w) for w in s.values()] for s in state_widths(c)]
    assert state_widths(c)[-1] == {"keys": 3 * d, "values": 3 * d, "filled": 3}
    without = config(cell=cell, tie_weights=tie, embedding_size=c.embedding_size, hidden_size=c.hidden_size, attention_window=0,
                     **stacked)
    assert count_parameters(model) == parameter_count(c, 11) == parameter_count(without, 11) + 2 * d * d + d + 2 * c.layer_sizes[-1] * d
    whole = Config(model=c)
    assert training_bytes(whole, 11) > training_bytes(Config(model=without), 11)
    if tie:
        assert model.decoder.weight is model.embedding.weight


def test_model_windows_in_turn_are_one_window_and_the_memory_is_carried():
    torch.manual_seed(1)
    model = LanguageModel(config(init_range=0.5), 11).double().eval()
    tokens = torch.randint(0, 11, (9, 2))
    with torch.no_grad():
        whole, final = model(tokens, model.init_state(2))
        first, carried = model(tokens[:4], model.init_state(2))
        second, again = model(tokens[4:], carried)
        forgot = [*carried[:-1], model.init_state(2)[-1]]
        amnesic, _ = model(tokens[4:], forgot)
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-12, rtol=0)
    assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for s, t in zip(final, again) for a, b in zip(s, t))
    assert (amnesic[0] - second[0]).abs().max() > 1e-6  # the memory, not only the layers' state, carries context


def test_the_decoder_reads_h_star_and_bf16_runs():
    torch.manual_seed(2)
    model = LanguageModel(config(), 11).eval()
    tokens = torch.randint(0, 11, (5, 2))
    with torch.no_grad():
        raw, dropped, state = model.hidden(tokens, model.init_state(2))
        logits, _ = model(tokens, model.init_state(2))
        assert torch.equal(model.decode(dropped), logits) and torch.equal(raw, dropped)
        assert raw.abs().max() < 1  # a tanh
        mixed, _ = model(tokens, model.init_state(2), compute_dtype=torch.bfloat16)
    assert torch.isfinite(mixed).all() and (mixed.float() - logits).abs().max() < 0.1


@pytest.mark.parametrize("cell, stack", [("lstm", "layers"), ("gru", "layers"), ("qrnn,dglstm", "layers"), ("lstm", "grid")])
def test_generation_steps_give_the_models_forward(cell, stack):
    torch.manual_seed(3)
    model = LanguageModel(config(cell=cell, stack=stack, embedding_size=8, init_range=0.4), 20).eval()
    tokens = torch.randint(0, 20, (7, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, expected_state = model(tokens, model.init_state(3))
    stepper, state, stepped = Stepper(model), model.init_state(3), []
    assert not stepper.can_draw()
    for token in tokens:
        logits, state = stepper.step(token, state)
        stepped.append(logits)
    assert torch.allclose(torch.stack(stepped), expected, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for s, t in zip(state, expected_state) for a, b in zip(s, t))


def test_generation_memory_stays_flat():
    """The state after 3 or 60 drawn tokens (and a prompt) is as large as the empty one: K slots."""
    from lmtrain.generation.sampler import SampleSettings, StreamRandom

    torch.manual_seed(4)
    model = LanguageModel(config(), 20)
    sizes = []
    for tokens in (3, 60):
        sampler = Sampler(model)
        empty = [tuple(t.shape) for s in sampler.state for t in s]
        sampler.feed([1, 5, 7, 2, 9])
        sampler = sampler.branch(2)
        drawn = list(sampler.draw(SampleSettings(max_tokens=tokens, temperature=1.0), StreamRandom(1, 2)))
        assert len(drawn) == tokens
        sizes.append([tuple(t.shape) for s in sampler.state for t in s])
        assert sampler.state[-1][2].min() == 1  # every slot filled
    assert sizes[0] == sizes[1] == [(2, width) for _, width in empty]


def test_lines_scored_side_by_side_are_scored_as_alone():
    """Padding comes after a line's tokens and attention looks back only: a short line beside a
    long one gets the log-probabilities it gets alone (`lmtrain score`)."""
    import numpy as np

    from lmtrain.evaluation.score import sequence_log_probs

    torch.manual_seed(5)
    model = LanguageModel(config(), 20)
    short, long = np.array([3, 4, 5, 1]), np.array([7, 8, 9, 10, 11, 12, 13, 1])
    together, _ = sequence_log_probs(model, [short, long], bptt=3)
    alone, _ = sequence_log_probs(model, [short], bptt=3)
    assert np.allclose(together[0], alone[0], atol=1e-6, rtol=0) and len(together[1]) == 8


def test_export_refuses_it_by_name():
    from lmtrain.model import onnx_bytes, torch_lstm_payload

    model = LanguageModel(config(), 11)
    with pytest.raises(LmtrainError, match=r"attention over past states \(model.attention_window = 3\)"):
        torch_lstm_payload(Config(model=config()), model.state_dict())
    pytest.importorskip("onnx")
    with pytest.raises(LmtrainError, match=r"does not cover the attention over past states \(model.attention_window\)"):
        onnx_bytes(model)


@pytest.mark.parametrize("setting, fragment", [
    ("model.attention_window=-1", "config key 'model.attention_window' must not be negative, got -1"),
    ("model.attention_window=1.5", "config key 'model.attention_window' must be int, got 1.5"),
    ("model.attention_window=65537", "config key 'model.attention_window' must be at most 65,536, got 65,537"),
    ("model.hidden_size=15", "config key 'model.attention_window' splits the top layer's output into key and value "
                             "halves: its units (model.hidden_size) must be even, got 15"),
    ("model.tie_weights=true", "its units (model.embedding_size, with model.tie_weights) must be even, got 13"),
])
def test_bad_values_are_one_error_line_naming_the_key(setting, fragment, tmp_path):
    items = ["model.attention_window=4", "model.embedding_size=13", setting]
    assert_config_refused(tmp_path, items, fragment, "model.attention_window")


ATTENTION = [*TINY_WORD, "model.layers=2", "model.attention_window=4", "train.log_interval=3"]


def test_train_evaluate_and_generate_through_the_cli(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    result = ok(cli("train", corpus, "--run-dir", run, *sets(*ATTENTION, "model.dropout=0.2", "train.ar=1",
                                                               "train.tar=1", "train.max_steps=6")))
    assert tomllib.loads((run / "config.toml").read_text())["model"]["attention_window"] == 4
    loaded = load_run(run, torch.device("cpu"))
    assert f"{parameter_count(loaded.config.model, loaded.model.vocab_size):,} parameters" in result.stderr
    metrics = json.loads(ok(cli("evaluate", run, "--split", "valid", "--json")).stdout)
    assert metrics["tokens"] > 0 and math.isfinite(metrics["ppl"])
    one = json.loads(ok(cli("evaluate", run, "--split", "valid", "--batch-size", "1", "--json")).stdout)
    for flag in ("--dynamic", "--cache"):
        other = json.loads(ok(cli("evaluate", run, "--split", "valid", flag, "--stats-batches", "2", "--json")).stdout)
        assert math.isfinite(other["ppl"]) and other["ppl"] != one["ppl"]
    first = ok(cli("generate", run, "--seed", "3", "--max-tokens", "8")).stdout
    assert first.strip() and first == ok(cli("generate", run, "--seed", "3", "--max-tokens", "8")).stdout


def test_resume_continues_exactly_with_the_memory_in_last_pt(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    keys = [*ATTENTION, "train.optimizer=adamw", "train.lr=0.003"]
    ok(cli("train", corpus, "--run-dir", tmp_path / "straight", *sets(*keys, "train.max_steps=8")))
    ok(cli("train", corpus, "--run-dir", tmp_path / "stopped", *sets(*keys, "train.max_steps=4")))
    payload = load_checkpoint(tmp_path / "stopped" / "last.pt")
    hidden = payload["resume"]["hidden"]
    assert len(hidden) == 3 and [tuple(t.shape) for t in hidden[-1]] == [(4, 32), (4, 32), (4, 4)]
    assert hidden[-1][2].min() == 1 and hidden[-1][0].abs().max() > 0  # a full memory of real outputs
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "stopped", broken)
    crafted = copy.deepcopy(payload)
    crafted["resume"]["hidden"][-1] = (hidden[-1][0][:, :16].clone(), *hidden[-1][1:])
    save_checkpoint(broken / "last.pt", crafted, keep_previous=False)
    assert_one_error(cli("train", "--resume", broken, "--set", "train.max_steps=8"),
                     "field resume['hidden'][2][0] has shape (4, 16), the config gives (4, 32)", "the attention's keys")
    ok(cli("train", "--resume", tmp_path / "stopped", "--set", "train.max_steps=8"))
    straight, resumed = (load_run(tmp_path / name, torch.device("cpu")).model.state_dict() for name in ("straight", "stopped"))
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


on_gpu = needs_cuda("the attention's window on the GPU and under CUDA graphs")


@on_gpu
def test_on_cuda_the_fast_path_is_the_reference_and_graphs_replay_it():
    from lmtrain.config import TrainConfig
    from lmtrain.training.distributed import WindowForward
    from lmtrain.training.graphs import WindowRunner
    from lmtrain.training.loop import train_window

    y, memory, weights = inputs(3, steps=7, seed=6)
    to_gpu = lambda t: t.detach().cuda().requires_grad_(t.requires_grad)  # noqa: E731
    gpu = outputs_and_grads(attend, to_gpu(y), tuple(map(to_gpu, memory)), tuple(map(to_gpu, weights)))
    assert worst([t.cpu() for t in gpu], outputs_and_grads(reference, y, memory, weights)) <= 1e-12
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 23, (n, 3), generator=g).cuda(), torch.randint(0, 23, (n, 3), generator=g).cuda())
            for n in (6, 4, 6, 6)]
    results = []
    for graphs in (True, False):
        torch.manual_seed(0)
        model = LanguageModel(config(hidden_size=8, embedding_size=8), 23).cuda().train()
        runner = WindowRunner(lambda x, y, s, m=model: train_window(WindowForward(m), TrainConfig(), None, x, y, s),
                              list(model.parameters()), graphs)
        state, got = model.init_state(3), []
        for x, t in data:
            loss, state = runner(x, t, [tuple(s.detach() for s in layer) for layer in state])
            got.append([loss.detach().clone(), *(s.detach().clone() for layer in state for s in layer),
                        *(p.grad.detach().clone() for p in model.parameters())])
        assert runner.use_graphs == graphs
        results.append(got)
    for replayed, eager in zip(*results):
        assert all((a - b).abs().max().item() <= 1e-5 for a, b in zip(replayed, eager))


@on_gpu
def test_train_evaluate_and_generate_on_cuda(tmp_path):
    corpus = write_small_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    ok(cli("train", corpus, "--run-dir", run, *sets(*ATTENTION, "train.device=cuda", "train.max_steps=6")))
    ok(cli("train", corpus, "--run-dir", tmp_path / "bf16", *sets(*ATTENTION, "train.device=cuda", "train.max_steps=6",
                                                                   "train.precision=bf16")))
    metrics = json.loads(ok(cli("evaluate", run, "--split", "valid", "--json")).stdout)
    assert math.isfinite(metrics["ppl"])
    assert ok(cli("generate", run, "--seed", "3", "--max-tokens", "8")).stdout.strip()
