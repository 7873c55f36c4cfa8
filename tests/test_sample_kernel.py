"""Parity of the fused sampling kernels (csrc/cpu/sampling.cpp, csrc/cuda/sampling.cu) with
gpt.sample_reference: the same token for the same uniforms, over temperatures, top-k, top-p, their
combination, ties at the k-th value and at the top-p boundary, greedy ties, -inf logits and rows
that cannot be sampled."""
import itertools

import pytest
import torch
from conftest import requires_cuda

import gpt

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
TEMPERATURES = (0.0, 0.5, 1.0, 2.0)
TOP_PS = (1.0, 0.9, 0.5, 1e-6)


def top_ks(V):
    return (0, 1, 50, V, V + 10)


def uniforms(B, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    u[0] = 0.0  # the first kept index
    if B > 1:
        u[-1] = 1.0 - 2.0**-53  # the last kept index
    return u


def check(logits, temperature, top_k, top_p, seed=0):
    u = uniforms(logits.size(0), seed).to(logits.device)
    want = gpt.sample_reference(logits, u, temperature, top_k, top_p)
    got = torch.ops.gpt.sample(logits, u, float(temperature), int(top_k), float(top_p))
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.cpu(), want.cpu()), (
        f"T={temperature} top_k={top_k} top_p={top_p}: rows {(got != want).nonzero().flatten().tolist()} "
        f"got {got.cpu().tolist()} want {want.cpu().tolist()}")
    return got


def randn_logits(B, V, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * scale).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,V", [(3, 1), (3, 2), (64, 1001), (3, 50257), (1, 50257)])
def test_grid(ext, device, B, V):
    logits = randn_logits(B, V, device, seed=B * 1000 + V)
    for i, (T, k, p) in enumerate(itertools.product(TEMPERATURES, top_ks(V), TOP_PS)):
        check(logits, T, k, p, seed=i)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,k,p", [(0.8, 50, 1.0), (1.0, 0, 0.9), (0.7, 200, 0.8), (0.0, 50, 0.9), (1.3, 0, 1.0)])
def test_batch_64_full_vocab(ext, device, T, k, p):
    check(randn_logits(64, 50257, device, seed=7), T, k, p, seed=3)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_at_kth(ext, device):
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 6, (64, 1001), generator=g).float().to(device)  # ~170 ties per value
    for k in (1, 50, 400):
        kth = torch.topk(logits, k).values[:, -1:]
        got = check(logits, 1.0, k, 1.0, seed=k)
        # every value tied with the k-th is kept: the draws reach well past k distinct tokens
        assert (logits.gather(1, got[:, None]) >= kth).all()
        assert ((logits >= kth).sum(1) > k).all()
        check(logits, 0.5, k, 0.5, seed=k + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_adversarial_strides(ext, device):
    # The CPU kernel starts its top-k scan from a threshold taken on every 32nd logit: rows whose
    # strided logits are the largest (or the smallest) must give the same tokens.
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 50257, generator=g)
    logits[0, ::32] = 1000 + torch.arange(0, 50257, 32, dtype=torch.float32)  # few above the sample's pick
    logits[1, ::32] = -1000.0
    logits[2, ::16] = 7.0  # ties everywhere at the top
    for k in (1, 50, 200):
        check(logits.to(device), 1.0, k, 1.0, seed=k)
        check(logits.to(device), 0.7, k, 0.9, seed=k + 1)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_at_top_p_boundary(ext, device):
    # 5 tokens at logit 2, then 40 tied tokens at logit 1 where the nucleus boundary falls, the rest low
    B, V = 64, 3000
    logits = torch.full((B, V), -4.0)
    logits[:, 100:105] = 2.0
    logits[:, 1000:1040] = 1.0
    logits = logits.to(device)
    p = torch.exp(torch.tensor([2.0, 1.0, -4.0]))
    total = 5 * p[0] + 40 * p[1] + (V - 45) * p[2]
    top_p = float((5 * p[0] + 10.5 * p[1]) / total)  # inside the tied group
    got = check(logits, 1.0, 0, top_p, seed=11)
    assert ((got >= 1000) & (got < 1040)).any()  # the tied group is kept, and drawn from
    assert ((got >= 100) & (got < 105) | (got >= 1000) & (got < 1040)).all()
    check(logits, 1.0, 500, top_p, seed=12)  # the same through top-k (500 keeps all of them)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_ties_and_neg_inf(ext, device):
    logits = torch.randn(4, 777)
    logits[0, [5, 300, 776]] = 10.0  # first index of the max
    logits[1] = 0.5  # all equal
    logits[2] = float("-inf")
    logits[2, 700] = -3.0
    logits[3, :776] = float("-inf")
    got = check(logits.to(device), 0.0, 0, 1.0)
    assert got.tolist() == [5, 0, 700, 776]


@pytest.mark.parametrize("device", DEVICES)
def test_broken_rows_give_minus_one(ext, device):
    """A row with a NaN or +inf, or all -inf, cannot be sampled: -1 there (sample_next_token
    raises on it), the other rows sampled as usual, on every path."""
    logits = randn_logits(6, 50257, "cpu", seed=5)
    logits[1, 50256] = float("nan")  # the very last logit
    logits[2, 0] = float("inf")
    logits[3] = float("-inf")
    logits[4, 1234:1300] = float("nan")
    logits[5] = float("nan")
    logits = logits.to(device)
    for i, (T, k, p) in enumerate(itertools.product(TEMPERATURES, (0, 50), TOP_PS)):
        got = check(logits, T, k, p, seed=i)
        assert got[1:].tolist() == [-1] * 5 and got[0] >= 0


@pytest.mark.parametrize("device", DEVICES)
def test_neg_inf_logits(ext, device):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 2000, generator=g) * 2
    logits[torch.rand(16, 2000, generator=g) < 0.98] = float("-inf")  # ~40 finite per row
    logits[:, 1234] = 0.0  # at least one finite value
    logits = logits.to(device)
    for i, (T, k, p) in enumerate(itertools.product((0.0, 0.6, 1.5), (0, 10, 100, 1999), TOP_PS)):
        got = check(logits, T, k, p, seed=i)
        assert torch.isfinite(logits.gather(1, got[:, None])).all()


@pytest.mark.parametrize("device", DEVICES)
def test_combined_top_k_top_p_many_draws(ext, device):
    logits = randn_logits(1, 50257, device, seed=21).expand(256, -1).contiguous()  # one row, 256 uniforms
    got = check(logits, 0.8, 50, 0.9, seed=5)
    assert len(set(got.tolist())) > 1


@pytest.mark.parametrize("device", DEVICES)
def test_through_generate_dispatch(ext, device):
    logits = randn_logits(5, 1001, device, seed=8)
    u = uniforms(5, 9).to(device)
    want = gpt.sample_reference(logits, u, 0.8, 40, 0.95)
    assert torch.equal(gpt._sample(logits, u, 0.8, 40, 0.95).cpu(), want.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(ext, device):
    logits = randn_logits(3, 500, device, seed=2)
    u = uniforms(3, 1).to(device)
    for args in ((0.8, 50, 0.9), (0.0, 0, 1.0), (1.0, 0, 0.5)):
        torch.library.opcheck(torch.ops.gpt.sample.default, (logits, u, *args))
