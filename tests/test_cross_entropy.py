"""Parity of the fused cross-entropy kernels (csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu)
with gpt.cross_entropy_reference (F.cross_entropy): row losses, the in-place gradient, and the mean
and gradients of gpt.cross_entropy against autograd through F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda

import gpt

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def make(N, V, device="cpu", seed=0, scale=3.0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * scale
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < ignore_frac] = -100
    return logits.to(device), targets.to(device)


def reference_grad(logits, targets, grad_scale):
    """grad_scale * (softmax - onehot) per row (0 on ignored rows), through float64 autograd."""
    x = logits.detach().double().requires_grad_()
    F.cross_entropy(x, targets, ignore_index=-100, reduction="sum").backward()
    return x.grad * grad_scale


def check_rows(logits, targets, grad_scale=0.37):
    want = gpt.cross_entropy_reference(logits, targets)
    rtol = 1e-5 if logits.device.type == "cpu" else 1e-4  # CUDA builds with --use_fast_math
    torch.testing.assert_close(torch.ops.gpt.cross_entropy_loss(logits, targets), want, atol=1e-4, rtol=rtol)
    grad = logits.clone()
    torch.testing.assert_close(torch.ops.gpt.cross_entropy_loss_grad_(grad, targets, grad_scale), want,
                               atol=1e-4, rtol=rtol)
    finite = torch.isfinite(want)[:, None].expand_as(grad)
    torch.testing.assert_close(grad[finite].double(), reference_grad(logits, targets, grad_scale)[finite],
                               atol=1e-6 * abs(grad_scale), rtol=1e-4)
    assert (grad[targets == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,V", [(1, 50257), (7, 50257), (1000, 1001), (3, 1), (5, 2), (64, 4099)])
def test_rows_match_reference(ext, device, N, V):
    logits, targets = make(N, V, device, seed=N * 7 + V)
    check_rows(logits, targets)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_and_no_ignored(ext, device):
    logits, targets = make(33, 3000, device, ignore_frac=0.0, scale=10.0)
    for grad_scale in (1.0, 1 / 33, -2.5):
        check_rows(logits, targets, grad_scale)


@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored(ext, device):
    logits, targets = make(6, 500, device, ignore_frac=1.0)
    assert (targets == -100).all()
    grad = logits.clone()
    assert (torch.ops.gpt.cross_entropy_loss(logits, targets) == 0).all()
    assert (torch.ops.gpt.cross_entropy_loss_grad_(grad, targets, 1.0) == 0).all()
    assert (grad == 0).all()
    x = logits.clone().requires_grad_()
    loss = gpt.cross_entropy(x, targets)  # the mean over no valid target: NaN, as F.cross_entropy
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, targets)) and (x.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(ext, device):
    V = 6000  # three 2048-float blocks of the CPU kernel
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, V, generator=g)
    x[0] = (torch.rand(V, generator=g) * 2 - 1) * 1e4  # +-1e4
    x[1, torch.rand(V, generator=g) < 0.9] = float("-inf")  # mostly -inf
    x[1, 17] = 1.5
    x[2, :4100] = float("-inf")  # leading blocks all -inf
    x[3, 5000] = 1e4  # the max jumps far above the first block's
    x[4, :2048] = -1e4  # a first block far below the rest
    x[5] = 0.0  # all equal
    x[6, 123] = 50.0  # target is the max
    x[7, ::3] = float("-inf")
    targets = torch.tensor([11, 17, 4500, 5000, 3000, 9, 123, 1], dtype=torch.long)
    check_rows(x.to(device), targets.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_target_raises(ext, device):
    logits, targets = make(4, 100, device, ignore_frac=0.0)
    for bad in (100, -5, -1):
        t = targets.clone()
        t[2] = bad
        with pytest.raises(RuntimeError, match="target"):
            torch.ops.gpt.cross_entropy_loss(logits, t)
        x = logits.clone()
        with pytest.raises(RuntimeError, match="target"):
            torch.ops.gpt.cross_entropy_loss_grad_(x, t, 1.0)
        assert torch.equal(x, logits)  # checked before anything is written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_mean_and_autograd(ext, device, inplace):
    B, T, V = 3, 37, 1001  # 3-D logits, as the model gives them
    logits, targets = make(B * T, V, device, seed=5)
    logits, targets = logits.view(B, T, V), targets.view(B, T)
    want_x = logits.clone().requires_grad_()
    want = F.cross_entropy(want_x.view(-1, V), targets.view(-1), ignore_index=-100)
    (want * 2.5).backward()

    x = logits.clone().requires_grad_()
    loss = gpt.cross_entropy(x, targets, inplace=inplace)
    (loss * 2.5).backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, want_x.grad, atol=1e-7, rtol=1e-4)
    assert (x.data_ptr() == x.grad.data_ptr()) == inplace  # in place: the gradient is the logits' storage

    # logits from a matmul (a non-leaf), the way the model's head gives them
    h = torch.randn(B * T, 16, device=device, requires_grad=True)
    w = torch.randn(V, 16, device=device, requires_grad=True)
    flat = targets.view(-1)
    F.cross_entropy(h @ w.t(), flat, ignore_index=-100).backward()
    want_h, want_w = h.grad, w.grad
    h.grad = w.grad = None
    gpt.cross_entropy(h @ w.t(), flat, inplace=inplace).backward()
    torch.testing.assert_close(h.grad, want_h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, want_w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_path(ext, device):
    logits, targets = make(50, 777, device, seed=9)
    with torch.no_grad():
        got = gpt.cross_entropy(logits, targets)
    want = F.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(ext, device):
    logits, targets = make(9, 301, device, seed=2)
    torch.library.opcheck(torch.ops.gpt.cross_entropy_loss.default, (logits, targets))
    torch.library.opcheck(torch.ops.gpt.cross_entropy_loss_grad_.default, (logits.clone(), targets, 0.25))


# --- bf16 logits ------------------------------------------------------------------------------------
# The kernels widen each bf16 row to float32: the row losses match F.cross_entropy on the same values
# in float32 (atol 1e-4, rtol 1e-5 on the CPU, 1e-4 with CUDA's __expf); the gradient is stored in
# bf16, so it is within one bf16 rounding (2^-9 relative) of the float64 gradient: atol
# 2^-9 |grad_scale|, rtol 2^-8.
def check_rows_bfloat16(logits, targets, grad_scale=0.37):
    logits = logits.bfloat16()
    want = gpt.cross_entropy_reference(logits, targets)
    got = torch.ops.gpt.cross_entropy_loss(logits, targets)
    rtol = 1e-5 if logits.device.type == "cpu" else 1e-4
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=rtol)
    grad = logits.clone()
    torch.testing.assert_close(torch.ops.gpt.cross_entropy_loss_grad_(grad, targets, grad_scale), want,
                               atol=1e-4, rtol=rtol)
    assert grad.dtype == torch.bfloat16
    finite = torch.isfinite(want)[:, None].expand_as(grad)
    torch.testing.assert_close(grad[finite].double(), reference_grad(logits.float(), targets, grad_scale)[finite],
                               atol=2**-9 * abs(grad_scale), rtol=2**-8)
    assert (grad[targets == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,V", [(1, 50257), (7, 50257), (1000, 1001), (3, 1), (5, 2), (64, 4099)])
def test_bfloat16_rows_match_reference(ext, device, N, V):
    logits, targets = make(N, V, device, seed=N * 7 + V)
    check_rows_bfloat16(logits, targets)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_extreme_logits_and_ties(ext, device):
    V = 6000
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, V, generator=g)
    x[0] = (torch.rand(V, generator=g) * 2 - 1) * 1e4
    x[1, :4100] = float("-inf")
    x[2, 5000] = 1e4
    x[3] = 0.0  # all tied
    x[4, ::2] = 3.0  # half tied at the max, target among them
    x[5, ::3] = float("-inf")
    targets = torch.tensor([11, 4500, 5000, 3000, 8, 1], dtype=torch.long)
    for grad_scale in (1.0, -2.5):
        check_rows_bfloat16(x.to(device), targets.to(device), grad_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_bfloat16_mean_and_autograd(ext, device, inplace):
    logits, targets = make(3 * 37, 1001, device, seed=6)
    logits = logits.bfloat16()
    want_x = logits.float().requires_grad_()
    F.cross_entropy(want_x, targets, ignore_index=-100).backward()
    x = logits.clone().requires_grad_()
    loss = gpt.cross_entropy(x, targets, inplace=inplace)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets, ignore_index=-100), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.float(), want_x.grad, atol=2**-9 * want_x.grad.abs().max().item(), rtol=2**-8)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_opcheck(ext, device):
    logits, targets = make(9, 301, device, seed=2)
    logits = logits.bfloat16()
    torch.library.opcheck(torch.ops.gpt.cross_entropy_loss.default, (logits, targets))
    torch.library.opcheck(torch.ops.gpt.cross_entropy_loss_grad_.default, (logits.clone(), targets, 0.25))
