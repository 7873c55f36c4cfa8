"""End-to-end training speed and the fused linear + cross-entropy, fp32 on the CPU.

    pytest bench/bench_train.py --benchmark-only

- linear + CE fwd+bwd at N=4096, C=768, V=50257: gpt.linear_cross_entropy on the ext kernels (chunked,
  the N x V logits never exist) against F.linear + F.cross_entropy; extra peak memory in extra_info.
- one training step (forward, loss, backward, AdamW step) of GPT-124M as the book trains it in
  chapter 5 (batch 2 x 256, dropout 0.1, no qkv bias, untied head): gpt.py on the ext and on the
  torch backend, each as gpt.train runs a step, and the book's GPTModel (llms_from_scratch.ch04) trained
  the book's way (its AdamW, zero_grad, F.cross_entropy over the full logits).
  extra_info["tokens_per_s"] is the median round's throughput.
"""
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import extra_peak_bytes

import gpt

N, C, V = 4096, 768, 50257


def linear_ce_case(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, C, generator=g)).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)

    def step():
        h.grad = w.grad = None
        if impl == "ext":
            with gpt.backend("ext"):
                gpt.linear_cross_entropy(h, w, targets).backward()
        else:
            F.cross_entropy(F.linear(h, w), targets).backward()

    benchmark.extra_info["extra_peak_MB"] = round(extra_peak_bytes(step) / 2**20, 1)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=0)


@pytest.mark.benchmark(group="linear + cross-entropy fwd+bwd (4096, 768, 50257)")
@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_linear_cross_entropy(benchmark, ext, impl):
    linear_ce_case(benchmark, impl)


BOOK_CFG = {"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
            "drop_rate": 0.1, "qkv_bias": False}


def train_step_case(benchmark, model, loss_fn, optimizer, set_to_none=True, rounds=4):
    torch.manual_seed(0)
    x, y = torch.randint(0, 50257, (2, 2, 256))
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=set_to_none)
        loss_fn(model, x, y).backward()
        optimizer.step()

    step()  # warm-up: allocator, optimizer state
    result = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info["tokens_per_s"] = round(x.numel() / statistics.median(benchmark.stats.stats.data), 1)
    return result


def gpt_loss(model, x, y):
    return model(x, y)


def book_loss(model, x, y):  # the book's calc_loss_batch
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


@pytest.mark.benchmark(group="train step GPT-124M (book config) 2x256")
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_train_step_gpt(benchmark, ext, backend):
    with gpt.backend(backend):
        torch.manual_seed(0)
        model = gpt.GPT(gpt.GPTConfig(**gpt.MODEL_PRESETS["book"]))
        # as gpt.train runs a step: its AdamW (fused; no decay on biases and norms), gradient buffers kept
        optimizer = model.configure_optimizer(4e-4, 0.1, (0.9, 0.999), "cpu")
        train_step_case(benchmark, model, gpt_loss, optimizer, set_to_none=False)


@pytest.mark.benchmark(group="train step GPT-124M (book config) 2x256")
def test_train_step_book(benchmark):
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(0)
    model = GPTModel(BOOK_CFG)
    train_step_case(benchmark, model, book_loss, torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1))
