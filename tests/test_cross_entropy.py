"""The fused cross-entropy (lmtrain/model/kernels/cpu/cross_entropy_cpu.cpp) against F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmtrain.model.kernels.build import cpu_ops
from lmtrain.model.kernels.cross_entropy import cross_entropy

compiled = pytest.mark.skipif(cpu_ops() is None, reason="the C++ ops could not be built here")


def reference(logits, targets, weights):
    x = logits.detach().float().requires_grad_()
    losses = F.cross_entropy(x, targets, ignore_index=-1, reduction="none")
    (losses * weights).sum().backward()
    return losses.detach(), x.grad


@compiled
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 4e-3)])
def test_values_and_gradients(dtype, tol):
    torch.manual_seed(0)
    logits = (4 * torch.randn(37, 1001)).to(dtype).requires_grad_()  # odd sizes: vector tails
    targets = torch.randint(0, 1001, (37,))
    targets[3] = -1  # padding: no loss, no gradient
    targets[4] = 1000
    weights = torch.rand(37)
    losses = cross_entropy(logits, targets)
    (losses * weights).sum().backward()
    expected, expected_grad = reference(logits, targets, weights)
    assert losses.dtype == torch.float32 and logits.grad.dtype == dtype
    assert torch.allclose(losses, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(logits.grad.float(), expected_grad, atol=tol, rtol=tol)
    assert losses[3] == 0 and (logits.grad[3] == 0).all()


@compiled
def test_target_outside_the_vocabulary_is_an_error():
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        cross_entropy(torch.zeros(2, 5), torch.tensor([1, 5]))


def test_fallback_computes_the_same(monkeypatch):
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    targets = torch.tensor([0, 49, -1, 3, 3, 7])
    monkeypatch.setenv("LMTRAIN_COMPILE", "0")
    fallback = cross_entropy(logits, targets)
    assert torch.allclose(fallback, F.cross_entropy(logits, targets, ignore_index=-1, reduction="none"))
    monkeypatch.setenv("LMTRAIN_COMPILE", "1")
    if cpu_ops() is not None:
        assert torch.allclose(cross_entropy(logits, targets), fallback, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_form_for_cuda_computes_what_torch_does(dtype, monkeypatch):
    """ChunkedCrossEntropy (CUDA's fused form: a block of rows at a time, only the log-sum-exp
    saved) against F.cross_entropy on float32 logits, on the CPU, over several blocks."""
    from lmtrain.model.kernels import cross_entropy as module

    monkeypatch.setattr(module, "CHUNK_ROWS", 7)
    torch.manual_seed(3)
    logits = (torch.randn(30, 50) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (30,))
    targets[[2, 9, 29]] = -1
    losses = module.ChunkedCrossEntropy.apply(logits, targets)
    weights = torch.rand(30)
    (losses * weights).sum().backward()
    reference = logits.detach().clone().requires_grad_()
    want = F.cross_entropy(reference.float(), targets, ignore_index=-1, reduction="none")
    (want * weights).sum().backward()
    assert losses.dtype == torch.float32 and logits.grad.dtype == dtype
    assert torch.allclose(losses, want, atol=1e-5) and (losses[[2, 9, 29]] == 0).all()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(logits.grad.float(), reference.grad.float(), atol=tol)
    assert (logits.grad[[2, 9, 29]] == 0).all()
