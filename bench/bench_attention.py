"""Causal attention, fp32 on the CPU: the fused gpt_ext kernel against PyTorch's SDPA (its flash
kernel without dropout, a math fallback that materializes T x T with dropout) and the book's
masked-softmax attention (gpt.causal_attention_reference, autograd).

    pytest bench/bench_attention.py --benchmark-only

Each candidate runs a few rounds after one untimed run that measures its extra peak memory
(extra_info["peak_bytes"]); the groups of pytest-benchmark's table compare like with like.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import extra_peak_bytes

import gpt

BIG, SMALL = (4, 12, 1024, 64), (8, 12, 256, 64)


def ext_attention(q, k, v, dropout_p=0.0):
    return torch.ops.gpt.attention_forward(q, k, v, dropout_p, 1234)[0]


def sdpa_attention(q, k, v, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


def naive_attention(q, k, v, dropout_p=0.0):
    return gpt.causal_attention_reference(q, k, v, dropout_p, 1234)[0]


IMPLS = {"ext": ext_attention, "sdpa": sdpa_attention, "naive": naive_attention}
ROUNDS = {"ext": 8, "sdpa": 5, "naive": 3}


def run_case(benchmark, impl, shape, dropout_p=0.0, backward=True, rounds=None):
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (torch.randn(*shape, generator=g) for _ in range(4))
    attention = IMPLS[impl]
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step():
            for t in (q, k, v):
                t.grad = None
            attention(q, k, v, dropout_p).backward(grad_out)
    else:
        def step():
            with torch.no_grad():
                attention(q, k, v, dropout_p)

    benchmark.extra_info["peak_bytes"] = extra_peak_bytes(step)  # also the warm-up run
    benchmark.pedantic(step, rounds=rounds or ROUNDS[impl], iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="attention fwd+bwd (4,12,1024,64)")
@pytest.mark.parametrize("impl", ["ext", "sdpa", "naive"])
def test_fwd_bwd(benchmark, ext, impl):
    run_case(benchmark, impl, BIG)


@pytest.mark.benchmark(group="attention fwd+bwd dropout 0.1 (4,12,1024,64)")
@pytest.mark.parametrize("impl", ["ext", "sdpa"])
def test_fwd_bwd_dropout(benchmark, ext, impl):
    run_case(benchmark, impl, BIG, dropout_p=0.1, rounds=3 if impl == "sdpa" else None)


@pytest.mark.benchmark(group="attention fwd (4,12,1024,64)")
@pytest.mark.parametrize("impl", ["ext", "sdpa", "naive"])
def test_fwd(benchmark, ext, impl):
    run_case(benchmark, impl, BIG, backward=False)


@pytest.mark.benchmark(group="attention fwd+bwd (8,12,256,64)")
@pytest.mark.parametrize("impl", ["ext", "sdpa", "naive"])
def test_fwd_bwd_small(benchmark, ext, impl):
    run_case(benchmark, impl, SMALL, rounds={"ext": 20, "sdpa": 10, "naive": 10}[impl])
