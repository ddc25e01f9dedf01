"""Our LSTM (hand-written BPTT) against torch.nn.LSTM, against its plain-autograd reference, and gradcheck."""

import pytest
import torch

from lmtrain.config import ModelConfig
from lmtrain.model.cells import lstm
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.recurrence import Recurrence, run_layer

F64 = torch.float64


def random_layer_inputs(steps=7, batch=3, input_size=5, hidden=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(steps, batch, input_size, generator=g, dtype=F64),
        torch.randn(batch, hidden, generator=g, dtype=F64) * 0.5,
        torch.randn(batch, hidden, generator=g, dtype=F64) * 0.5,
        torch.randn(4 * hidden, input_size, generator=g, dtype=F64) * 0.4,
        torch.randn(4 * hidden, hidden, generator=g, dtype=F64) * 0.4,
        torch.randn(4 * hidden, generator=g, dtype=F64) * 0.4,
    ]
    return [t.requires_grad_() for t in tensors]


def grads_of(outputs, inputs, seed=1):
    """Gradients of a random weighting of all outputs, so every output's gradient path is used."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def test_gradcheck_with_state_in_and_out():
    x, h0, c0, w_ih, w_hh, b = random_layer_inputs(steps=4, batch=2, input_size=3, hidden=3)
    run = lambda x, h0, c0, w_ih, w_hh, b: Recurrence.apply(lstm, 2, None, x, w_ih, w_hh, b, None, h0, c0)
    assert torch.autograd.gradcheck(run, (x, h0, c0, w_ih, w_hh, b))


def test_matches_plain_autograd_reference():
    inputs = random_layer_inputs()
    x, h0, c0, w_ih, w_hh, b = inputs
    y, (h, c) = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    y_ref, (h_ref, c_ref) = lstm.reference(x, (h0, c0), w_ih, w_hh, b)
    for ours, ref in [(y, y_ref), (h, h_ref), (c, c_ref)]:
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for ours, ref in zip(grads_of([y, h, c], inputs), grads_of([y_ref, h_ref, c_ref], inputs)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_stack_matches_torch_nn_lstm(layers):
    """Same weights, float64: outputs, final states and every gradient within 1e-10."""
    steps, batch, input_size, hidden = 9, 4, 6, 5
    torch.manual_seed(layers)
    reference = torch.nn.LSTM(input_size, hidden, num_layers=layers, dtype=F64)
    x = torch.randn(steps, batch, input_size, dtype=F64, requires_grad=True)
    h0 = torch.randn(layers, batch, hidden, dtype=F64, requires_grad=True)
    c0 = torch.randn(layers, batch, hidden, dtype=F64, requires_grad=True)
    y_ref, (h_ref, c_ref) = reference(x, (h0, c0))

    ours_params = []
    out, h_ours, c_ours = x, [], []
    for k in range(layers):
        w_ih = getattr(reference, f"weight_ih_l{k}").detach().clone().requires_grad_()
        w_hh = getattr(reference, f"weight_hh_l{k}").detach().clone().requires_grad_()
        bias = (getattr(reference, f"bias_ih_l{k}") + getattr(reference, f"bias_hh_l{k}")).detach().clone().requires_grad_()
        ours_params.append((w_ih, w_hh, bias))
        out, (h, c) = run_layer(lstm, out, (h0[k], c0[k]), w_ih, w_hh, bias)
        h_ours.append(h)
        c_ours.append(c)
    h_ours, c_ours = torch.stack(h_ours), torch.stack(c_ours)

    for ours, ref in [(out, y_ref), (h_ours, h_ref), (c_ours, c_ref)]:
        assert (ours - ref).abs().max().item() < 1e-10

    ref_params = [p for k in range(layers) for p in (getattr(reference, f"weight_ih_l{k}"), getattr(reference, f"weight_hh_l{k}"), getattr(reference, f"bias_ih_l{k}"))]
    flat_ours = [p for triple in ours_params for p in triple]
    grads_ours = grads_of([out, h_ours, c_ours], [x, h0, c0] + flat_ours)
    grads_ref = grads_of([y_ref, h_ref, c_ref], [x, h0, c0] + ref_params)
    for ours, ref in zip(grads_ours, grads_ref):
        assert (ours - ref).abs().max().item() < 1e-10


def test_bias_gradient_matches_both_torch_biases():
    """Our single bias gets the gradient that each of torch's two biases gets."""
    reference = torch.nn.LSTM(3, 4, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64)
    reference(x)[0].sum().backward()
    bias = (reference.bias_ih_l0 + reference.bias_hh_l0).detach().clone().requires_grad_()
    y, _ = run_layer(lstm, x, (torch.zeros(2, 4, dtype=F64), torch.zeros(2, 4, dtype=F64)), reference.weight_ih_l0.detach(), reference.weight_hh_l0.detach(), bias)
    y.sum().backward()
    torch.testing.assert_close(bias.grad, reference.bias_hh_l0.grad, rtol=0, atol=1e-12)


def test_model_uses_no_torch_recurrent_modules():
    model = LanguageModel(ModelConfig(layers=2, embedding_size=8, hidden_size=8), vocab_size=11)
    forbidden = (torch.nn.LSTM, torch.nn.LSTMCell, torch.nn.GRU, torch.nn.GRUCell, torch.nn.RNN, torch.nn.RNNCell)
    assert not any(isinstance(m, forbidden) for m in model.modules())


def test_model_state_is_explicit_and_carries():
    """Running a sequence in two halves with the state passed along equals running it whole."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(layers=2, embedding_size=8, hidden_size=8), vocab_size=13).double().eval()
    tokens = torch.randint(0, 13, (10, 3))
    whole, state_whole = model(tokens, model.init_state(3))
    first, state = model(tokens[:4], model.init_state(3))
    second, state = model(tokens[4:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    for (h1, c1), (h2, c2) in zip(state, state_whole):
        torch.testing.assert_close(h1, h2)
        torch.testing.assert_close(c1, c2)


def test_tied_weights_share_one_matrix():
    model = LanguageModel(ModelConfig(embedding_size=8, hidden_size=8, tie_weights=True), vocab_size=10)
    assert model.decoder.weight is model.embedding.weight


def test_lstm_kernel_gradcheck():
    from lmtrain.model.kernels.lstm import LSTMSequence

    inputs = random_layer_inputs(steps=4, batch=2, input_size=3, hidden=3)
    assert torch.autograd.gradcheck(LSTMSequence.apply, inputs)


def test_lstm_kernel_equals_generic_engine(monkeypatch):
    """The fast path and the cell's per-step functions on the engine give the same numbers."""
    inputs = random_layer_inputs(steps=6, batch=3, input_size=4, hidden=5)
    x, h0, c0, w_ih, w_hh, b = inputs
    fast = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    monkeypatch.setenv("LMTRAIN_KERNELS", "0")
    generic = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    assert fast[0].grad_fn.name() != generic[0].grad_fn.name()  # both paths really ran
    outs_fast, outs_generic = [fast[0], *fast[1]], [generic[0], *generic[1]]
    for a, b_ in zip(outs_fast, outs_generic):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-13)
    for a, b_ in zip(grads_of(outs_fast, inputs), grads_of(outs_generic, inputs)):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-13)


@pytest.fixture(params=["panels", "onednn"])
def sequence_gemms(request, monkeypatch):
    """Run the backward's sequence-wide GEMMs (dX, dW) both ways, whatever the hidden size."""
    import lmtrain.model.kernels.lstm as lstm_kernels

    monkeypatch.setattr(lstm_kernels, "SEQUENCE_PANELS_MIN_HIDDEN", 0 if request.param == "panels" else 10**9)
    return request.param


@pytest.mark.parametrize("batch, hidden", [(5, 9), (13, 37), (25, 70)])
def test_lstm_kernel_float32_path_matches_float64(batch, hidden, sequence_gemms):
    """float32 on CPU runs our panel GEMM (AVX-512) or oneDNN's: compare with float64 numbers.

    The shapes leave partial panels of 32 outputs (4·37 = 148, 37, 280, 70), an odd K, and
    uneven row blocks (13 rows as 7 + 6, 25 as 9 + 8 + 8).
    """
    inputs = random_layer_inputs(steps=12, batch=batch, input_size=7, hidden=hidden)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out64 = run_layer(lstm, inputs[0], tuple(inputs[1:3]), *inputs[3:])
    out32 = run_layer(lstm, inputs32[0], tuple(inputs32[1:3]), *inputs32[3:])
    flat64, flat32 = [out64[0], *out64[1]], [out32[0], *out32[1]]
    for a, b_ in zip(flat32, flat64):
        torch.testing.assert_close(a.double(), b_, rtol=0, atol=1e-5)
    for a, b_ in zip(grads_of(flat32, inputs32), grads_of(flat64, inputs)):
        torch.testing.assert_close(a.double(), b_, rtol=0, atol=1e-4)


@pytest.mark.parametrize("batch, hidden", [(4, 7), (13, 37)])
def test_lstm_kernel_bfloat16_path_matches_float32(batch, hidden, sequence_gemms):
    """bfloat16 (our pair-panel GEMM with AVX512-BF16, else oneDNN) against the float32 path."""
    inputs = [t.detach().float().requires_grad_() for t in random_layer_inputs(steps=10, batch=batch, input_size=5, hidden=hidden)]
    inputs16 = [t.detach().bfloat16().requires_grad_() for t in inputs]
    out32 = run_layer(lstm, inputs[0], tuple(inputs[1:3]), *inputs[3:])
    out16 = run_layer(lstm, inputs16[0], tuple(inputs16[1:3]), *inputs16[3:])
    flat32, flat16 = [out32[0], *out32[1]], [out16[0], *out16[1]]
    for a, b_ in zip(flat16, flat32):
        torch.testing.assert_close(a.float(), b_, rtol=0.05, atol=0.03)
    for a, b_ in zip(grads_of(flat16, inputs16), grads_of(flat32, inputs)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b_, rtol=0.05, atol=0.05 * b_.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_loops_equal_python_loops(monkeypatch, dtype):
    """The C++ time loops (lstm_cpu.cpp) against the same loops in Python."""
    from lmtrain.model.kernels.build import cpu_ops

    if cpu_ops() is None:
        pytest.skip("the C++ loops could not be built here (no compiler or ninja); the Python loops are in use")
    inputs = [t.detach().to(dtype).requires_grad_() for t in random_layer_inputs(steps=9, batch=4, input_size=6, hidden=7)]
    x, h0, c0, w_ih, w_hh, b = inputs
    compiled = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    monkeypatch.setenv("LMTRAIN_COMPILE", "0")
    python = run_layer(lstm, x, (h0, c0), w_ih, w_hh, b)
    tol = 1e-12 if dtype == torch.float64 else 2e-6  # float32 uses a polynomial exp in C++
    flat_c, flat_p = [compiled[0], *compiled[1]], [python[0], *python[1]]
    for a, b_ in zip(flat_c, flat_p):
        torch.testing.assert_close(a, b_, rtol=0, atol=tol)
    for a, b_ in zip(grads_of(flat_c, inputs), grads_of(flat_p, inputs)):
        torch.testing.assert_close(a, b_, rtol=0, atol=tol * 10)
