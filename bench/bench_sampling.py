"""Next-token sampling, fp32 on the CPU, V = 50257: the gpt_ext kernel (torch.ops.gpt.sample, uniforms
drawn in the timed step) against the book's torch step (topk, where, softmax, multinomial), a
sort-based torch top-p, and torch.argmax on the same logits as a floor.

    pytest bench/bench_sampling.py --benchmark-only
"""
import pytest
import torch

V, T, K = 50257, 0.8, 50


def logits_for(B):
    g = torch.Generator().manual_seed(B)
    return torch.randn(B, V, generator=g) * 3  # GPT-2-like spread of logits


def ext_sample(logits, top_k, top_p):
    u = torch.rand(logits.size(0), dtype=torch.float64)
    return torch.ops.gpt.sample(logits, u, T, top_k, top_p)


def book_top_k(logits):
    """The book's generate step: top-k, temperature, softmax, multinomial."""
    top_logits, _ = torch.topk(logits, K)
    logits = torch.where(logits < top_logits[:, -1:], torch.tensor(float("-inf")), logits)
    probs = torch.softmax(logits / T, dim=-1)
    return torch.multinomial(probs, 1)


def torch_top_p(logits, top_p=0.9):
    """Nucleus sampling the usual torch way: sort, cumsum, mask, multinomial."""
    probs = torch.softmax(logits / T, dim=-1)
    sorted_p, sorted_i = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    sorted_p = sorted_p.masked_fill(cum - sorted_p > top_p, 0.0)
    return sorted_i.gather(-1, torch.multinomial(sorted_p, 1))


def argmax(logits):
    return torch.argmax(logits, dim=-1)


def run(benchmark, fn, logits, rounds):
    fn(logits)  # warm-up
    benchmark.pedantic(fn, args=(logits,), rounds=rounds, iterations=1, warmup_rounds=2)


TOP_K_IMPLS = {"ext": lambda x: ext_sample(x, K, 1.0), "book": book_top_k, "argmax": argmax}
TOP_P_IMPLS = {"ext": lambda x: ext_sample(x, 0, 0.9), "torch": torch_top_p}


@pytest.mark.benchmark(group="sample B=1 V=50257 top_k=50 T=0.8")
@pytest.mark.parametrize("impl", ["ext", "book", "argmax"])
def test_top_k_b1(benchmark, ext, impl):
    run(benchmark, TOP_K_IMPLS[impl], logits_for(1), rounds=300)


@pytest.mark.benchmark(group="sample B=64 V=50257 top_k=50 T=0.8")
@pytest.mark.parametrize("impl", ["ext", "book", "argmax"])
def test_top_k_b64(benchmark, ext, impl):
    run(benchmark, TOP_K_IMPLS[impl], logits_for(64), rounds=20 if impl == "book" else 100)


@pytest.mark.benchmark(group="sample top_p=0.9 B=1 V=50257 T=0.8")
@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_top_p_b1(benchmark, ext, impl):
    run(benchmark, TOP_P_IMPLS[impl], logits_for(1), rounds=50 if impl == "torch" else 300)


@pytest.mark.benchmark(group="sample top_p=0.9 B=64 V=50257 T=0.8")
@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_top_p_b64(benchmark, ext, impl):
    run(benchmark, TOP_P_IMPLS[impl], logits_for(64), rounds=10 if impl == "torch" else 50)
