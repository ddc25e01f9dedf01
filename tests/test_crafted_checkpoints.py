"""Crafted checkpoints with valid checksums (lmtrain/model/payload.py, lmtrain/training/payload_resume.py).

One real tiny run is trained once; every case below loads its best.pt or last.pt, breaks one field
(its type, range, shape or its consistency with the others) and writes it back with a valid
checksum. `evaluate` and `generate` (and `train --resume` for last.pt) must refuse each with exit 2
and one line naming the file and the field, in well under a second, without a large allocation,
and a refused resume must leave every file of the run as it was.
"""

from __future__ import annotations

import copy
import math
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_WORD, assert_one_error, cli, make_lines, ok, private_cache_one_thread, train_small_run, tree_bytes

from lmtrain.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from lmtrain.config import CELLS, ModelConfig
from lmtrain.errors import LmtrainError
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.payload import model_shapes, parameter_keys
from lmtrain.text.tokenizer import train_tokenizer

SETTINGS = [
    *TINY_WORD, "train.optimizer=adamw",
    "train.checkpoint_every=4", "train.max_steps=10",
]
MORE = ["--set", "train.max_steps=20"]  # the resume asked for
LIMIT_S = 1.5  # the design goal is well under a second; this bound leaves room for a loaded machine
LIMIT_RSS_KB = 200 * 1024


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run stopped by train.max_steps mid-epoch: best.pt, and a last.pt with AdamW's state, the
    carried hidden state and the epoch's window lengths."""
    return train_small_run(tmp_path_factory.mktemp("crafted"), SETTINGS)[1]


def timed(*args):
    """The CLI call, its seconds and how much the process' peak memory grew (KB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = cli(*args)
    return result, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak


def refused(args, *fragments: str) -> str:
    result, seconds, grown = timed(*args)
    line = assert_one_error(result, *fragments)
    assert seconds < LIMIT_S, f"{seconds:.2f} s: {line}"
    assert grown < LIMIT_RSS_KB, f"peak memory grew {grown // 1024} MB: {line}"
    return line


# --- the mutations: each takes a payload (a deep copy) and breaks one thing -------------------------


def setting(section: str, key: str, value):
    def change(p):
        p["config"][section][key] = value
    return change


def both(*changes):
    def change(p):
        for one in changes:
            one(p)
    return change


def put(*keys_and_value):
    """put("progress", "step", -1): p["progress"]["step"] = -1."""
    *keys, value = keys_and_value

    def change(p):
        target = p
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return change


def drop(*keys):
    def change(p):
        target = p
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return change


def poisoned(value: float):
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return change


def fewer_pieces(p):
    """A real word tokenizer of the same corpus with 40 pieces, under a model of 80."""
    tokenizer = train_tokenizer(make_lines(150, 0), "word", 40)
    assert tokenizer.vocab_size < p["vocab_size"]
    p["tokenizer"]["model"] = tokenizer.model_proto


def expanded_bomb(p):
    """The attack of issue 15: hidden_size 20000 in a file of a few KB, every weight of the right
    shape but a view of one stored value (strides of 0), which torch.load rebuilds as it is."""
    p["config"]["model"]["hidden_size"] = 20000
    one = torch.zeros(())
    shapes = model_shapes(ModelConfig(**{**p["config"]["model"], "hidden_size": 20000}), p["vocab_size"])
    p["model"] = {k: one.expand(shape) for k, shape in shapes.items()}


def shared_storage(p):
    """Every weight a contiguous view of the embedding's storage: no stride tricks, but the model
    needs more values than the file holds."""
    base = p["model"]["embedding.weight"].reshape(-1)
    p["model"] = {k: base[: math.prod(t.shape)].view(t.shape) if math.prod(t.shape) <= base.numel() else t
                  for k, t in p["model"].items()}


def nested(depth: int):
    def change(p):
        value: list = []
        for _ in range(depth):
            value = [value]
        p["notes"] = value
    return change


# (mutation, fragments of the error) for best.pt's fields: every reader checks them
COMMON = {
    "config-not-a-dict": (put("config", [1, 2]), "field config must be a dict"),
    "config-section-not-a-dict": (put("config", "model", 5), "field config['model'] must be a dict"),
    "config-value-of-wrong-type": (setting("model", "hidden_size", "big"), "model.hidden_size", "must be int"),
    "config-value-a-nested-list": (setting("model", "hidden_size", [[[1]]]), "config['model']['hidden_size']",
                                   "plain value"),
    "config-unknown-key": (setting("model", "colour", "red"), "unknown config key 'model.colour'"),
    "config-negative-layers": (setting("model", "layers", -1), "model.layers", "must be positive"),
    "hidden-size-20000": (setting("model", "hidden_size", 20000), "config['model']['hidden_size'] = 20,000",
                          "larger than the checkpoint's weights"),
    "hidden-size-2**63-1": (setting("model", "hidden_size", 2**63 - 1), "config['model']['hidden_size']",
                            "larger than the checkpoint's weights"),
    "hidden-size-2**200": (setting("model", "hidden_size", 2**200), "config['model']['hidden_size']", "out of range"),
    "layers-10**6": (setting("model", "layers", 10**6), "config['model']['layers'] = 1,000,000", "larger"),
    "embedding-size-10**9": (setting("model", "embedding_size", 10**9), "config['model']['embedding_size']", "larger"),
    "hidden-size-17": (setting("model", "hidden_size", 17), "do not fit the model",
                       "model['layers.0.w_ih'] has shape (64, 12), the config gives (68, 12)"),
    "two-layers": (setting("model", "layers", 2), "do not fit the model", "has no 'layers.1.w_ih'"),
    "tied-weights": (setting("model", "tie_weights", True), "do not fit the model"),
    "attention-window": (setting("model", "attention_window", 4), "do not fit the model", "has no 'attention.w_y'"),
    "seed-beyond-int64": (setting("train", "seed", 2**64), "config['train']['seed']", "out of range"),
    "eval-batch-size-10**9": (setting("train", "eval_batch_size", 10**9), "train.eval_batch_size' must be at most"),
    "eval-window-2**40-tokens": (both(setting("train", "eval_batch_size", 2**20), setting("train", "bptt", 2**20)),
                                 "one evaluation window of train.eval_batch_size 1,048,576 x train.bptt 1,048,576 need"),
    "eval-batch-size-2**62": (setting("train", "eval_batch_size", 2**62), "train.eval_batch_size' must be at most 1,048,576, got 4,611,686,018,427,387,904"),
    "no-corpus": (drop("corpus"), "no 'corpus' field"),
    "corpus-not-a-str": (put("corpus", 5), "field corpus must be a non-empty str"),
    "corpus-digests-not-hex": (put("corpus_digests", {"test": 5}), "field corpus_digests['test']"),
    "no-progress": (drop("progress"), "no 'progress' field"),
    "progress-not-a-dict": (put("progress", "done"), "field progress must be a dict"),
    "progress-negative-step": (put("progress", "step", -1), "field progress['step'] = -1 is out of range"),
    "progress-without-epoch": (drop("progress", "epoch"), "field progress has no key 'epoch'"),
    "progress-unknown-at": (put("progress", "at", "later"), "field progress['at']"),
    "no-optimizer": (drop("optimizer"), "no 'optimizer' field"),
    "optimizer-not-a-dict": (put("optimizer", 3), "field optimizer must be a dict"),
    "no-vocab-size": (drop("vocab_size"), "no 'vocab_size' field"),
    "negative-vocab-size": (put("vocab_size", -5), "field vocab_size = -5 is out of range"),
    "vocab-size-true": (put("vocab_size", True), "field vocab_size must be an integer"),
    "vocab-size-10**12": (put("vocab_size", 10**12), "field vocab_size", "out of range"),
    "vocab-size-plus-7": (put("vocab_size", lambda v: v + 7), "do not fit the model",
                          "model['embedding.weight'] has shape (80, 12), the config gives (87, 12)"),
    "model-not-a-dict": (put("model", 3), "field model must be a dict"),
    "weights-a-list": (put("model", "decoder.bias", [0.0] * 80), "field model['decoder.bias'] must be a tensor"),
    "integer-weights": (put("model", "decoder.bias", lambda t: t.long()), "model['decoder.bias'] holds int64 values"),
    "double-weights": (put("model", "decoder.bias", lambda t: t.double()), "model['decoder.bias'] holds float64"),
    "nan-weights": (put("model", "layers.0.w_hh", poisoned(math.nan)), "model['layers.0.w_hh'] holds NaN or infinite"),
    "inf-weights": (put("model", "decoder.weight", poisoned(math.inf)), "model['decoder.weight'] holds NaN or infinite"),
    "extra-weight": (put("model", "layers.1.w_ih", torch.zeros(3)), "has an unexpected 'layers.1.w_ih'"),
    "missing-weight": (drop("model", "decoder.bias"), "do not fit the model", "field model has no 'decoder.bias'"),
    "wrong-shape": (put("model", "layers.0.w_hh", torch.zeros(64, 15)),
                    "model['layers.0.w_hh'] has shape (64, 15), the config gives (64, 16)"),
    "transposed": (put("model", "decoder.weight", lambda t: t.t().contiguous()),
                   "model['decoder.weight'] has shape (16, 80), the config gives (80, 16)"),
    "stride-0-weights": (put("model", "embedding.weight", torch.zeros(()).expand(80, 12)),
                         "model['embedding.weight'] is a tensor of shape (80, 12) over a storage of 4 bytes"),
    "stride-0-hidden-size-20000": (expanded_bomb, "model['embedding.weight'] is a tensor of shape (80, 12) over a "
                                   "storage of 4 bytes"),
    "weights-sharing-one-storage": (shared_storage, "parameters, but the checkpoint's weights hold"),
    "tokenizer-with-fewer-pieces": (fewer_pieces, "field tokenizer['model'] has 40 pieces, but vocab_size",
                                    "is 80"),
    "tokenizer-unknown-kind": (put("tokenizer", "kind", "morse"), "field tokenizer['kind'] = 'morse' is not a tokenizer kind"),
    "tokenizer-other-kind": (put("tokenizer", "kind", "char"), "field tokenizer['kind'] = 'char'",
                             "config gives tokenizer.kind = 'word'"),
    "tokenizer-garbage": (put("tokenizer", "model", b"\x00garbage bytes"), "field tokenizer['model'] is not a sentencepiece model"),
    "tokenizer-empty": (put("tokenizer", "model", b""), "safe load refuses"),  # torch.save pickles b"" as bytes()
    "tokenizer-a-str": (put("tokenizer", "model", "pieces"), "field tokenizer['model'] must be"),
    "tokenizer-not-a-dict": (put("tokenizer", None), "field tokenizer must be a dict"),
    "tokenizer-without-model": (drop("tokenizer", "model"), "field tokenizer has no key 'model'"),
    "nested-100-deep": (nested(100), "nested too deeply"),
}


def adamw_state(key: str, value):
    return put("optimizer", "state", 0, key, value)


def loop(key: str, value):
    return put("resume", "loop", key, value)


def averaging_under_adamw(p):
    """NT-ASGD's average, the trained weights and the flag, coherent, but the config trains with adamw."""
    p["resume"]["average"] = {"average": [t.clone() for k, t in p["model"].items()], "count": 3}
    p["resume"]["trained"] = dict(p["model"])
    p["progress"]["averaging"] = True


def trained_without_average(p):
    p["resume"]["trained"] = dict(p["model"])


def longer_last_window(p):
    p["resume"]["loop"]["lengths"][-1] += 3  # after the window in progress: the position still adds up


# last.pt's resume entry and optimizer: what train --resume checks before it changes the run
RESUME = {
    "resume-missing": (drop("resume"), "without exact resume"),
    "resume-not-a-dict": (put("resume", [1]), "field resume must be a dict"),
    "resume-without-rng": (drop("resume", "rng"), "field resume has no key 'rng'"),
    "optimizer-state-wrong-shape": (adamw_state("exp_avg", torch.zeros(3)), "optimizer['state'][0]['exp_avg'] has shape (3,)"),
    "optimizer-state-integers": (adamw_state("exp_avg", lambda t: t.long()), "['exp_avg'] holds int64 values"),
    "optimizer-state-nan": (adamw_state("exp_avg", poisoned(math.nan)), "['exp_avg'] holds NaN or infinite"),
    "optimizer-negative-squares": (adamw_state("exp_avg_sq", poisoned(-1.0)), "['exp_avg_sq'] holds negative values"),
    "optimizer-negative-step": (adamw_state("step", torch.tensor(-3.0)), "optimizer['state'][0]['step'] = -3.0"),
    "optimizer-state-a-str": (adamw_state("exp_avg", "zeros"), "optimizer['state'][0]['exp_avg'] must be a tensor"),
    "optimizer-state-stride-0": (adamw_state("exp_avg", torch.zeros(()).expand(80, 12)), "over a storage of 4 bytes"),
    "optimizer-state-of-no-parameter": (put("optimizer", "state", 99, {}), "optimizer['state'][99]",
                                        "no param_group holds"),
    "optimizer-no-param-groups": (put("optimizer", "param_groups", []), "field optimizer does not load into the adamw"),
    "optimizer-group-one-short": (put("optimizer", "param_groups", 0, "params", lambda ids: ids[:-1]),
                                  "does not load into the adamw optimizer"),
    "optimizer-group-ids-not-ints": (put("optimizer", "param_groups", 0, "params", ["a"]), "must be a list of parameter ids"),
    "optimizer-other-weight-decay": (put("optimizer", "param_groups", 0, "weight_decay", 5.0),
                                     "['weight_decay'] = 5.0, but the config's adamw optimizer has 0.0"),
    "optimizer-other-betas": (put("optimizer", "param_groups", 0, "betas", (0.5, "x")), "['betas']"),
    "optimizer-nan-lr": (put("optimizer", "param_groups", 0, "lr", math.nan), "['lr'] = nan is out of range"),
    "rng-torch-wrong-size": (put("resume", "rng", "torch", torch.zeros(10, dtype=torch.uint8)),
                             "field resume['rng']['torch'] must be torch's generator state"),
    "rng-torch-floats": (put("resume", "rng", "torch", lambda t: t.float()), "resume['rng']['torch']"),
    "rng-python-short": (put("resume", "rng", "python", (3, (1, 2, 3), None)), "field resume['rng'] cannot be set"),
    "rng-python-not-a-tuple": (put("resume", "rng", "python", 7), "field resume['rng']['python'] must be"),
    "rng-numpy-short-key": (put("resume", "rng", "numpy", "state", "key", [1, 2]), "field resume['rng'] cannot be set"),
    "rng-window-generator-unknown": (put("resume", "rng", "window_lengths", {"bit_generator": "nope"}),
                                     "field resume['rng'] cannot be set"),
    "rng-cuda-not-a-list": (put("resume", "rng", "cuda", 3), "field resume['rng']['cuda']"),
    "loop-not-a-dict": (put("resume", "loop", 3), "field resume['loop'] must be a dict"),
    "loop-negative-step": (loop("step", -1), "field resume['loop']['step'] = -1 is out of range"),
    "loop-epoch-0": (loop("epoch", 0), "field resume['loop']['epoch'] = 0 is out of range"),
    "loop-window-past-the-end": (loop("window", 30), "field resume['loop']['window'] = 30 is past the end of the "
                                 "epoch's 24 windows"),
    "loop-position-off-by-one": (loop("position", lambda n: n + 1), "field resume['loop']['position'] = 121"),
    "loop-lengths-not-a-list": (loop("lengths", "many"), "field resume['loop']['lengths'] must be None or a list"),
    "loop-zero-length-window": (put("resume", "loop", "lengths", 0, 0), "field resume['loop']['lengths'][0] = 0"),
    "loop-lengths-past-the-data": (longer_last_window, "resume['loop']['lengths'] covers 287 rows, but the training "
                                   "split gives 284"),
    "loop-nan-lr": (loop("lr", math.nan), "field resume['loop']['lr'] = nan"),
    "loop-inf-elapsed": (loop("elapsed_s", math.inf), "field resume['loop']['elapsed_s'] = inf"),
    "loop-negative-tokens": (loop("epoch_tokens", -1.0), "field resume['loop']['epoch_tokens']"),
    "loop-without-lr": (drop("resume", "loop", "lr"), "field resume['loop'] has no key 'lr'"),
    "loop-unknown-key": (loop("speed", 3), "field resume['loop'] has an unknown key 'speed'"),
    "loop-metrics-bytes-2**70": (loop("metrics_bytes", 2**70), "resume['loop']['metrics_bytes']", "out of range"),
    "loop-history-of-strs": (loop("valid_history", ["low"]), "resume['loop']['valid_history'][0] must be a number"),
    "hidden-wrong-shape": (put("resume", "hidden", 0, 0, torch.zeros(3, 16)),
                           "field resume['hidden'][0][0] has shape (3, 16), the config gives (4, 16)"),
    "hidden-one-tensor": (put("resume", "hidden", 0, lambda s: s[:1]), "field resume['hidden'][0] must be the cell's 2"),
    "hidden-two-layers": (put("resume", "hidden", lambda h: h * 2), "must be one state for each of the 1 layers"),
    "hidden-nan": (put("resume", "hidden", 0, 1, poisoned(math.nan)), "resume['hidden'][0][1] holds NaN"),
    "hidden-none-mid-epoch": (put("resume", "hidden", None), "field resume['hidden'] is None in the middle of an epoch"),
    "average-under-adamw": (averaging_under_adamw, "field resume['average'] is set, but train.optimizer is 'adamw'"),
    "average-without-trained": (put("resume", "average", {"average": [], "count": 1}), "field resume['average']",
                                "disagree"),
    "trained-without-average": (trained_without_average, "field resume['average']", "disagree"),
    "data-not-hex": (put("resume", "data", "0" * 63 + "z"), "field resume['data'] must be the tokens' sha256"),
    "two-processes": (put("resume", "processes", 2), "written by a run of 2 processes"),
    "progress-step-not-the-loop's": (put("progress", "step", 9), "field progress['step']"),
}


def crafted(source: Path, target: Path, change) -> Path:
    payload = copy.deepcopy(load_checkpoint(source))
    change(payload)
    save_checkpoint(target, payload, keep_previous=False)
    return target


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.mark.parametrize("case", list(COMMON))
def test_evaluate_and_generate_refuse_a_crafted_checkpoint(trained, tmp_path, case):
    change, *fragments = COMMON[case]
    path = crafted(trained / "best.pt", tmp_path / f"{case}.pt", change)
    before = tree_bytes(tmp_path)
    for command in (["evaluate", path], ["generate", path, "--max-tokens", "3", "--seed", "1"]):
        refused(command, str(path), *fragments)
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("case", list(COMMON) + list(RESUME))
def test_resume_refuses_a_crafted_last_pt_leaving_the_run_as_it_was(run, case):
    change, *fragments = {**COMMON, **RESUME}[case]
    crafted(run / "last.pt", run / "last.pt", change)
    before = tree_bytes(run)
    refused(["train", "--resume", run, *MORE], str(run / "last.pt"), *fragments)
    assert tree_bytes(run) == before


def test_a_clean_copy_still_resumes_and_evaluates(run):
    """The cases above differ from this run by one field each: unchanged, it works."""
    crafted(run / "last.pt", run / "last.pt", lambda p: None)
    ok(cli("train", "--resume", run, *MORE))
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 20
    ok(cli("evaluate", run))


def test_corpus_digests_are_accepted(trained, tmp_path):
    """Another helper's optional key: a dict of split name -> hex digest."""
    digests = {"train": "ab" * 32, "valid": "cd" * 32, "test": "ef" * 32}
    path = crafted(trained / "best.pt", tmp_path / "digests.pt", put("corpus_digests", digests))
    assert "test:" in ok(cli("evaluate", path)).stdout


def test_a_version_1_checkpoint_still_evaluates(trained, tmp_path):
    """Version 1: no checksum, no resume entry, no progress['at']."""
    payload = load_checkpoint(trained / "best.pt")
    old = {k: payload[k] for k in ("config", "corpus", "tokenizer", "vocab_size", "model", "optimizer")}
    old["progress"] = {k: v for k, v in payload["progress"].items() if k != "at"}
    path = tmp_path / "v1.pt"
    torch.save({"format": FORMAT, "version": 1, **old}, path)
    assert "test:" in ok(cli("evaluate", path)).stdout
    ok(cli("generate", path, "--max-tokens", "3", "--seed", "1"))


@pytest.mark.parametrize("cell", [*CELLS, "peephole,gru"])
@pytest.mark.parametrize("tie", [False, True])
def test_the_computed_shapes_are_the_models(cell, tie):
    """payload.model_shapes stands in for building the model: it must agree with the real one, in
    its shapes or in refusing a stack (dglstm on a wider dglstm layer, which tie_weights makes)."""
    # widths the clockwork cell's default 4 modules divide; tied, the last layer is the narrower
    config = ModelConfig(cell=cell, layers=2 if "," in cell else 3, hidden_size=8, embedding_size=4, tie_weights=tie)
    try:
        model = LanguageModel(config, 7)
    except LmtrainError as refused:
        assert tie and "model.tie_weights" in str(refused)
        with pytest.raises(LmtrainError) as also:
            model_shapes(config, 7)
        assert str(also.value) == str(refused)
        return
    shapes = model_shapes(config, 7)
    assert list(shapes.items()) == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert [shapes[k] for k in parameter_keys(config, shapes)] == [tuple(p.shape) for p in model.parameters()]


@pytest.mark.parametrize("cell", ["lstm", "qrnn", "gru,dglstm"])
@pytest.mark.parametrize("tie", [False, True])
def test_the_computed_shapes_with_attention_are_the_models(cell, tie):
    """model.attention_window adds the attention's parameters between the layers' and the decoder's."""
    config = ModelConfig(cell=cell, layers=2, hidden_size=6, embedding_size=6 if tie else 4, tie_weights=tie,
                         attention_window=3)
    model = LanguageModel(config, 7)
    shapes = model_shapes(config, 7)
    assert list(shapes.items()) == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert [shapes[k] for k in parameter_keys(config, shapes)] == [tuple(p.shape) for p in model.parameters()]
    assert [k for k in shapes if k.startswith("attention.")] == ["attention.w_y", "attention.w_h", "attention.w",
                                                                   "attention.w_r", "attention.w_x"]
