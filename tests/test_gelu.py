"""Parity of the tanh GELU kernel (csrc/cpu/gelu.cpp) with float64 references, forward and gradient,
on fresh random inputs: awkward sizes (1, not a multiple of a vector or of the kernel's 1024-value
chunks), both tails (|x| up to 1e4, where exp would overflow), zeros.
The reference is x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): equal to F.gelu(approximate=
"tanh")'s 0.5 x (1 + tanh(u)), which float64 computes to 0 or a few digits in the negative tail
(1 + tanh(u) cancels); the two agree elsewhere (checked).
Tolerances: float32 within 1e-5 relative: in the negative tail s = 1 / (1 + exp(-2u)) inherits the
rounding of its float32 argument (|2u| up to 88: 88 * 2^-24 = 5e-6), where torch's float32 GELU
gives 0; bf16 within one bf16 rounding of the float64 value (rtol 2^-8)."""
import pytest
import torch
import torch.nn.functional as F

import gpt


def inputs(shape, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-30])[: x.numel()]  # zeros and a tiny value
    return x.to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,scale", [((1,), 1.0), ((3, 37, 65), 3.0), ((2, 256, 3072), 2.0), ((1031,), 1e4)])
def test_matches_torch(ext, shape, dtype, scale):
    x, grad = inputs(shape, dtype, scale, seed=len(shape))
    leaf = x.clone().requires_grad_()
    out = torch.ops.gpt.gelu(leaf)
    out.backward(grad)
    x64 = x.double().requires_grad_()
    want = x64 * torch.sigmoid(2 * 0.7978845608028654 * (x64 + 0.044715 * x64**3))
    want.backward(grad.double())
    middle = x64.detach().abs() < 3
    torch.testing.assert_close(want.detach()[middle], F.gelu(x64.detach()[middle], approximate="tanh"))
    assert out.dtype == dtype and leaf.grad.dtype == dtype
    tol = dict(atol=1e-30, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-30, rtol=2**-8)
    torch.testing.assert_close(out.double(), want.detach(), **tol)
    # the gradient's factor s + 2xs(1-s)u' sums terms of either sign: absolute to its own scale
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2**-8, rtol=2**-8)
    torch.testing.assert_close(leaf.grad.double(), x64.grad, **tol)


def test_nonfinite_inputs_stay_nonfinite(ext):
    """inf -> inf and NaN -> NaN as torch; -inf -> -inf (-inf times a tiny s), where torch gives NaN:
    either way the loss is non-finite and the training step is caught."""
    got = torch.ops.gpt.gelu(torch.tensor([float("inf"), float("-inf"), float("nan"), 1.0]))
    assert got[0] == float("inf") and got[1] == float("-inf") and got[2].isnan() and got[3].isfinite()


def test_opcheck(ext):
    for dtype in (torch.float32, torch.bfloat16):
        x, grad = inputs((2, 7, 33), dtype, 2.0, seed=1)
        torch.library.opcheck(torch.ops.gpt.gelu.default, (x,))
        torch.library.opcheck(torch.ops.gpt.gelu_backward.default, (grad, x))


def test_bad_inputs_are_rejected(ext):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.gpt.gelu(x.double())
    with pytest.raises(RuntimeError, match="must match x"):
        torch.ops.gpt.gelu_backward(x[:2], x)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.gpt.gelu(x.t())


def test_the_model_runs_it_and_matches_the_torch_path(ext, monkeypatch):
    """A training step's loss and gradients through the MLP, ext against torch, and the MLP calls the op."""
    real = torch.ops.gpt.gelu
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=48, block_size=16, dropout=0.0)).train()
    x, y = torch.randint(0, 50257, (2, 3, 16))
    results, calls = {}, {}
    for backend in ("ext", "torch"):
        with gpt.backend(backend):
            model(x[:, :2], y[:, :2])  # (the kernel check, where one runs)
            calls[backend] = []
            monkeypatch.setattr(gpt.torch.ops.gpt, "gelu", lambda t: calls[backend].append(t.shape) or real(t),
                                raising=False)
            model.zero_grad()
            loss = model(x, y)
            loss.backward()
            monkeypatch.undo()
        results[backend] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    assert calls == {"ext": [(3, 16, 192)] * 2, "torch": []}
    for a, b in zip(results["ext"], results["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
