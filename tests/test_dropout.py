"""Parity of the fused residual dropout (csrc/cpu/dropout.cpp) with gpt.dropout_add_reference: the
same hash mask (gpt.dropout_keep_at of each element's flat index), out = x + y * keep / (1 - p), gradients grad and grad * keep / (1 - p).
Tolerances: float32 outputs within 1e-6 (one float32 rounding); a bf16 output or bf16 gradient within
one bf16 rounding of the float64 value (rtol 2^-8)."""
import math

import pytest
import torch

import gpt

DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


def make(shape, x_dtype, y_dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x, y, grad = (torch.randn(shape, generator=g) * scale for _ in range(3))
    return x.to(x_dtype), y.to(y_dtype), grad.to(torch.promote_types(x_dtype, y_dtype))


@pytest.mark.parametrize("x_dtype,y_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 37, 65), (2, 256, 768), (5, 1, 1)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_matches_reference(ext, shape, x_dtype, y_dtype, p):
    x, y, grad = make(shape, x_dtype, y_dtype, seed=len(shape), scale=1e3 if shape == (5, 1, 1) else 1.0)
    xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
    out = torch.ops.gpt.dropout_add(xl, yl, p, 4321)
    out.backward(grad)
    keep = gpt.dropout_keep_at(4321, torch.arange(math.prod(shape)).view(shape), p).double()
    want = x.double() + y.double() * keep / (1 - p)
    assert out.dtype == torch.promote_types(x_dtype, y_dtype) and yl.grad.dtype == y_dtype
    torch.testing.assert_close(gpt.dropout_add_reference(x, y, p, 4321).double(), want, atol=1e-5, rtol=1e-6)
    tol = dict(atol=1e-6, rtol=1e-6) if out.dtype == torch.float32 else dict(atol=1e-6, rtol=2**-8)
    torch.testing.assert_close(out.double(), want, **tol)
    assert torch.equal(xl.grad, grad)
    tol = dict(atol=1e-6, rtol=1e-6) if y_dtype == torch.float32 else dict(atol=1e-6, rtol=2**-8)
    torch.testing.assert_close(yl.grad.double(), grad.double() * keep / (1 - p), **tol)


def test_mask_rate_and_seed():
    p, n = 0.1, 1 << 20
    keep = gpt.dropout_keep_at(9, torch.arange(n), p)
    assert abs(keep.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert not torch.equal(keep, gpt.dropout_keep_at(10, torch.arange(n), p))
    # attention's mask is the same hash over its (B, H, T, T) positions
    positions = torch.arange(2 * 3 * 16 * 16).view(2, 3, 16, 16)
    assert torch.equal(gpt.attention_dropout_keep(3, 2, 3, 16, 0.2), gpt.dropout_keep_at(3, positions, 0.2))


def test_opcheck(ext):
    for x_dtype, y_dtype in DTYPES:
        x, y, grad = make((2, 7, 33), x_dtype, y_dtype)
        torch.library.opcheck(torch.ops.gpt.dropout_add.default, (x, y, 0.25, 17))
        torch.library.opcheck(torch.ops.gpt.dropout_backward.default, (grad, 0.25, 17, y_dtype))


def test_bad_inputs_are_rejected(ext):
    x, y, _ = make((4, 8), torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.gpt.dropout_add(x, y[:2], 0.1, 0)
    with pytest.raises(RuntimeError, match="p must be"):
        torch.ops.gpt.dropout_add(x, y, 1.0, 0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.gpt.dropout_add(x.double(), y.double(), 0.1, 0)


def test_backends_agree_in_the_model(ext):
    """A training forward and backward of a small model with dropout: ext (fused residual dropout,
    attention kernel) and torch (the references) draw the same seeds and give the same loss and grads."""
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.2)).train()
    x, y = torch.randint(0, 50257, (2, 3, 32))
    results = {}
    for backend in ("ext", "torch"):
        with gpt.backend(backend):
            model.zero_grad()
            torch.manual_seed(1)
            loss = model(x, y)
            loss.backward()
        results[backend] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    for got, want in zip(results["ext"], results["torch"]):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
