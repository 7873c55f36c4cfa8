"""Cross-entropy forward + backward, fp32 on the CPU: gpt.cross_entropy(..., inplace=True) on the
gpt_ext kernel (the gradient overwrites the logits in the forward sweep) against F.cross_entropy.

    pytest bench/bench_cross_entropy.py --benchmark-only

Each candidate runs once untimed to measure its extra peak memory (extra_info["extra_peak_MB"]),
then a few timed rounds; the pytest-benchmark groups compare like with like.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import extra_peak_bytes

import gpt

V = 50257


def ext_step(x, targets):
    with gpt.backend("ext"):
        gpt.cross_entropy(x, targets, inplace=True).backward()  # x.grad is x's own storage


def torch_step(x, targets):
    F.cross_entropy(x, targets, ignore_index=-100).backward()


def run_case(benchmark, impl, N, rounds):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::97] = -100
    step_fn = ext_step if impl == "ext" else torch_step

    def step():
        x.grad = None
        step_fn(x, targets)

    benchmark.extra_info["extra_peak_MB"] = round(extra_peak_bytes(step) / 2**20, 1)  # also the warm-up
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="cross-entropy fwd+bwd (8192,50257)")
@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_fwd_bwd_big(benchmark, ext, impl):
    run_case(benchmark, impl, 8192, rounds=5 if impl == "ext" else 3)


@pytest.mark.benchmark(group="cross-entropy fwd+bwd (1024,50257)")
@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_fwd_bwd_small(benchmark, ext, impl):
    run_case(benchmark, impl, 1024, rounds=20 if impl == "ext" else 10)
