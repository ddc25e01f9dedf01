"""Mixed precision (train.precision = bf16): bfloat16 GEMM operands, float32 sums, state, gradients
and master weights. The LSTM's AVX512-BF16 kernel against the engine's emulation (operands rounded
to bfloat16, multiplied in float32), every cell against float32, the fused path against the
engine, the CUDA form of the product on the meta device, and training end to end."""

import json

import pytest
import torch
from helpers import cli, ok, private_cache_one_thread, write_corpus
from test_cells import grads_of, layer_inputs, leaves
from test_fused import fused_against_engine

from lmtrain.checkpoint import load_checkpoint
from lmtrain.config import ModelConfig
from lmtrain.model.cells import CELLS, lstm
from lmtrain.model.kernels import dispatch, mixed
from lmtrain.model.kernels.lstm import MixedLSTMSequence, mixed_available
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.recurrence import Recurrence, run_layer

BF16 = torch.bfloat16
ENGINE_CELLS = [name for name, cell in CELLS.items() if dispatch.on_engine(cell)]  # a cell of its own layer: its own tests


@pytest.fixture(scope="module", autouse=True)
def isolated_env(tmp_path_factory):
    with private_cache_one_thread(tmp_path_factory):
        yield


def float_inputs(cell, **sizes):
    """layer_inputs in float32, leaves requiring grad, split back into run_layer's arguments."""
    x, state, w_ih, w_hh, b_ih, b_hh, extra = layer_inputs(cell, **sizes)
    inputs = [t.detach().float().requires_grad_() for t in leaves(x, state, w_ih, w_hh, b_ih, b_hh, extra)]
    n = len(state)
    rest = inputs[4 + n :]
    b_hh = rest[0] if cell.RECURRENT_BIAS else None
    extra = tuple(rest[1:] if cell.RECURRENT_BIAS else rest)
    return inputs, (inputs[0], tuple(inputs[1 : 1 + n]), *inputs[1 + n : 4 + n], b_hh, extra)


def outputs_and_grads(run, inputs):
    y, final = run()
    outputs = [y, *final]
    return outputs + list(grads_of(outputs, inputs))


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_operands_are_rounded_and_summed_in_float32():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 40, generator=g), torch.randn(40, 5, generator=g)
    exact = (a.to(BF16).double() @ b.to(BF16).double()).float()  # the bf16 values' products, summed exactly
    ours = mixed.mm(mixed.operand(a, BF16), mixed.operand(b, BF16))
    assert ours.dtype == torch.float32
    assert relative(ours, exact) < 1e-6  # float32 sums, not bfloat16 ones
    assert relative(ours, a @ b) > 1e-4  # and the operands really were rounded
    assert mixed.operand(a, None) is a and torch.equal(mixed.mm(a, b, b[0]), torch.addmm(b[0], a, b))


def test_cuda_form_multiplies_bfloat16_into_float32():
    """The call CUDA runs (bfloat16 operands, out_dtype float32), checked for shapes and types on
    the meta device, since no GPU is here."""
    a, b = torch.empty(4, 8, device="meta", dtype=BF16), torch.empty(8, 3, device="meta", dtype=BF16)
    out = torch.empty(4, 3, device="meta")
    assert mixed.mm(a, b).dtype == torch.float32
    assert mixed.mm(a, b, torch.empty(3, device="meta")).shape == (4, 3)
    assert mixed.mm(a, b, out=out) is out


@pytest.mark.skipif(not mixed_available(torch.empty(1)), reason="needs AVX512-BF16 and the compiled kernels")
@pytest.mark.parametrize("sizes", [{"steps": 5, "batch": 3, "input_size": 7, "hidden": 9},  # odd K: an unpaired k
                                   {"steps": 4, "batch": 13, "input_size": 33, "hidden": 40}])  # two row blocks, two panels
def test_lstm_kernel_matches_the_engines_emulation(sizes):
    inputs, (x, state, w_ih, w_hh, b_ih, _, _) = float_inputs(lstm, **sizes)

    def split(outputs):
        return outputs[0], outputs[1:]

    kernel = outputs_and_grads(lambda: split(MixedLSTMSequence.apply(x, *state, w_ih, w_hh, b_ih)), inputs)
    emulated = outputs_and_grads(lambda: split(Recurrence.apply(lstm, 2, BF16, x, w_ih, w_hh, b_ih, None, *state)), inputs)
    fp32 = outputs_and_grads(lambda: run_layer(lstm, x, state, w_ih, w_hh, b_ih), inputs)
    for k, e, f in zip(kernel, emulated, fp32):
        assert k.dtype == torch.float32
        assert relative(k, e) < 1e-5  # the same arithmetic, summed in another order
        assert 1e-5 < relative(k, f) < 3e-2  # bfloat16 operands: close to float32, not equal


def test_run_layer_takes_the_kernel_for_the_lstm(monkeypatch):
    if not mixed_available(torch.empty(1)):
        pytest.skip("needs AVX512-BF16 and the compiled kernels")
    monkeypatch.setenv("LMTRAIN_SELF_CHECK", "0")  # counts the kernel's calls: no check's call among them
    called = []
    monkeypatch.setattr(MixedLSTMSequence, "apply", lambda *a: called.append(1) or Recurrence.apply(lstm, 2, BF16, a[0], *a[3:], None, *a[1:3]))
    _, (x, state, w_ih, w_hh, b_ih, _, _) = float_inputs(lstm)
    run_layer(lstm, x, state, w_ih, w_hh, b_ih, compute_dtype=BF16)
    run_layer(lstm, x.double(), tuple(s.double() for s in state), w_ih.double(), w_hh.double(), b_ih.double(), compute_dtype=BF16)
    assert called == [1]  # float64 input: no mixed precision


@pytest.mark.parametrize("name", ENGINE_CELLS)
def test_every_cell_close_to_float32_with_float32_gradients(name):
    cell = CELLS[name]
    inputs, args = float_inputs(cell, steps=6, batch=4, input_size=10, hidden=6)
    low = outputs_and_grads(lambda: run_layer(cell, *args, compute_dtype=BF16), inputs)
    full = outputs_and_grads(lambda: run_layer(cell, *args), inputs)
    for a, b in zip(low, full):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert relative(a, b) < 5e-2


@pytest.mark.parametrize("name", ENGINE_CELLS)
def test_fused_path_matches_the_engine_in_mixed_precision(name, monkeypatch):
    assert fused_against_engine(CELLS[name], "traced", monkeypatch, dtype=torch.float32, compute_dtype=BF16,
                                steps=5, batch=3, hidden=6) <= 1e-5


def test_model_keeps_float32_master_weights_and_gradients():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=24, dropout=0.0), 50)
    tokens = torch.randint(0, 50, (7, 3))
    logits, state = model(tokens, model.init_state(3), torch.bfloat16)
    assert logits.dtype == BF16  # the decoder's product, taken as it is by the loss
    assert all(s.dtype == torch.float32 for layer in state for s in layer)  # h and c
    logits.float().sum().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    reference = LanguageModel(ModelConfig(layers=2, embedding_size=16, hidden_size=24, dropout=0.0), 50)
    reference.load_state_dict(model.state_dict())
    full, _ = reference(tokens, reference.init_state(3))
    assert relative(logits.float(), full) < 5e-2


def test_training_in_bf16_follows_float32(tmp_path):
    """The same run in both precisions: the bf16 run learns as the float32 one does (losses within
    a few percent at every logged step) and saves float32 weights."""
    corpus = write_corpus(tmp_path / "corpus")
    settings = ["tokenizer.kind=word", "tokenizer.vocab_size=80", "model.layers=2", "model.dropout=0.0", "model.embedding_size=24",
                "model.hidden_size=32", "train.batch_size=4", "train.bptt=10", "train.max_steps=60",
                "train.log_interval=10", "train.lr=20", "train.optimizer=sgd"]
    losses, valid = {}, {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        args = [a for item in (*settings, f"train.precision={precision}") for a in ("--set", item)]
        ok(cli("train", corpus, "--run-dir", run, *args))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[precision] = [r["loss"] for r in records if r["kind"] == "train"]
        valid[precision] = records[-1]["valid_loss"]
        weights = load_checkpoint(run / "best.pt")["model"]
        assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    assert len(losses["bf16"]) == len(losses["fp32"]) >= 6
    assert valid["bf16"] < losses["bf16"][0] - 0.1  # it learns
    assert abs(valid["bf16"] - valid["fp32"]) / valid["fp32"] < 0.03  # the engine's path (LMTRAIN_COMPILE=0) lands at 2.3 %
    for low, full in zip(losses["bf16"], losses["fp32"]):
        assert abs(low - full) / full < 0.03
