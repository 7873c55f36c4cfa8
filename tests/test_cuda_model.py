"""The model on a CUDA GPU against the same model on the CPU (issue 13, item 4): a few training
steps in float32 and under bf16 autocast, linear+cross-entropy and attention inside GPT, greedy
generation, and the kernel check's one line. Skipped, with the reason, where torch sees no GPU:
no GPU has been lent to this project, so these have not run yet.

GPT_TEST_DEVICE=cpu runs the same comparisons CPU against CPU (a check of the tests themselves)."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import gpt

DEVICE = os.environ.get("GPT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (none is lent to this project yet)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# awkward sizes: head size 20, a vocabulary and a sequence length no block divides
CONFIG = dict(n_layer=2, n_head=3, n_embd=60, block_size=96, vocab_size=1003, dropout=0.0)


def models(**overrides):
    torch.manual_seed(0)
    cpu = gpt.GPT(gpt.GPTConfig(**{**CONFIG, **overrides}))
    return cpu, copy.deepcopy(cpu).to(DEVICE)


def batch(B=3, T=77, V=1003, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    y[0, :5] = -100  # some ignored targets
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_steps_match_the_cpu(dtype):
    cpu, dev = models()  # no dropout: nn.Dropout draws from each device's own generator
    opts = [m.configure_optimizer(1e-3, 0.1, (0.9, 0.95), d) for m, d in ((cpu, "cpu"), (dev, DEVICE))]
    x, y = batch()
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for step in range(3):
        losses = []
        for model, opt, device in ((cpu, opts[0], "cpu"), (dev, opts[1], DEVICE)):
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach().float().cpu())
        torch.testing.assert_close(losses[1], losses[0], **tol, msg=f"loss at step {step}")
    for (name, a), b in zip(cpu.named_parameters(), dev.parameters()):
        torch.testing.assert_close(b.detach().float().cpu(), a.detach().float(), **tol, msg=name)


def test_linear_cross_entropy_and_attention_inside_the_model():
    cpu, dev = models()
    x, y = batch(seed=2)
    for model, device in ((cpu, "cpu"), (dev, DEVICE)):
        model(x.to(device), y.to(device)).backward()
    for (name, a), b in zip(cpu.named_parameters(), dev.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # the logits path (attention, no loss) and the no-grad loss path
        torch.testing.assert_close(dev(x.to(DEVICE)).cpu(), cpu(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dev(x.to(DEVICE), y.to(DEVICE)).cpu(), cpu(x, y), atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_the_cpu():
    cpu, dev = models()
    cpu.eval()
    dev.eval()
    prompt = batch(B=2, T=9, seed=3)[0]
    want = gpt.generate(cpu, prompt, 100)  # past block_size: the context slides
    got = gpt.generate(dev, prompt.to(DEVICE), 100)
    assert torch.equal(got.cpu(), want)


def test_the_kernel_check_says_its_choice(tmp_path):
    code = (f"import torch, gpt\n"
            f"x = torch.randn(1, 2, 16, 8, device='{DEVICE}')\n"
            f"gpt.causal_attention(x, x, x)\n")
    env = {k: v for k, v in os.environ.items() if k != "GPT_BACKEND"}
    env["GPT_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    name = gpt.device_name(torch.device(DEVICE))
    line = [s for s in run.stderr.splitlines() if s.startswith("kernels: ")]
    assert len(line) == 1 and f" on {name}, checked" in line[0], run.stderr
    assert all(f"{k}=" in line[0] for k, (_, devices) in gpt.KERNELS.items() if DEVICE in devices)
