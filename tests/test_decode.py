"""gpt::decode_block (one block, one new token per row, KV cache) against Block.forward's torch
path (nn.Linear, LayerNorm, scaled_dot_product_attention), on random weights with non-zero
biases and awkward sizes: head sizes not a multiple of any vector width, matrix heights not a
multiple of the kernel's 4-row and 64-row blocks, batch > 1, the first and the last cache slot."""
import pytest
import torch

import gpt


def random_block(n_head, n_embd, block_size, qkv_bias, scale=1.0, seed=0):
    torch.manual_seed(seed)
    cfg = gpt.GPTConfig(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=block_size, qkv_bias=qkv_bias)
    block = gpt.Block(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, scale / n_embd**0.5 if p.dim() == 2 else 0.5)
    return cfg, block


def filled_cache(cfg, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def both_paths(block, cfg, x, pos):
    """(output, cache_k, cache_v) from the torch path and from the fused kernel, same inputs."""
    out = {}
    for backend in ("torch", "ext"):
        cache = tuple(c.clone() for c in filled_cache(cfg, x.size(0)))
        with gpt.backend(backend), torch.inference_mode():
            out[backend] = (block(x, cache, pos), *cache)
    return out["torch"], out["ext"]


@pytest.mark.parametrize("n_head,n_embd,B,pos,qkv_bias", [
    (1, 16, 1, 1, True),     # one head; the smallest cache read
    (3, 60, 3, 7, False),    # head size 20; 3C = 180 rows: a partial 4-row group and 64-row chunk
    (4, 64, 2, 31, True),    # the last cache slot
    (12, 768, 1, 100, True),  # GPT-2 124M's block
    (5, 85, 4, 18, False),   # odd everything: head size 17, 4C = 340
])
def test_decode_block_matches_torch(ext, n_head, n_embd, B, pos, qkv_bias):
    cfg, block = random_block(n_head, n_embd, 32 if n_embd < 768 else 128, qkv_bias)
    x = torch.randn(B, 1, n_embd)
    (ref, ref_k, ref_v), (got, got_k, got_v) = both_paths(block, cfg, x, pos)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, ref_k, rtol=0, atol=1e-5)  # this token's k, v written at pos
    torch.testing.assert_close(got_v, ref_v, rtol=0, atol=1e-5)
    assert not torch.equal(got_k[:, :, pos], filled_cache(cfg, B)[0][:, :, pos])


def test_decode_block_large_values(ext):
    """Large weights and inputs: attention scores in the hundreds (a near one-hot softmax), GELU
    far out on both tails."""
    cfg, block = random_block(4, 64, 32, True, scale=8.0)
    x = 50 * torch.randn(2, 1, 64)
    (ref, _, _), (got, _, _) = both_paths(block, cfg, x, 20)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


def test_generate_takes_the_fused_step_only_when_it_applies(ext, monkeypatch):
    calls = []
    fused = gpt.decode_block
    monkeypatch.setattr(gpt, "decode_block", lambda *a: calls.append(a[3]) or fused(*a))
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    prompt = torch.randint(50257, (1, 5))
    gpt.generate(model, prompt, 4)
    assert calls == [5, 5, 6, 6, 7, 7]  # 2 blocks x 3 decode steps (the prompt runs unfused)
    calls.clear()
    with torch.no_grad():  # with autograd recording, or in training mode, the torch path runs
        cache = model.new_kv_cache(1)
        model(prompt, kv_cache=cache)
        with torch.enable_grad():
            model(prompt[:, :1], kv_cache=cache, pos=5)
        model.train()
        model(prompt[:, :1], kv_cache=cache, pos=5)
    assert calls == []


def test_opcheck(ext):
    cfg, block = random_block(3, 60, 32, True)
    a, m = block.attn, block.mlp
    weights = [block.ln_1.weight, block.ln_1.bias, a.c_attn.weight, a.c_attn.bias, a.c_proj.weight, a.c_proj.bias,
               block.ln_2.weight, block.ln_2.bias, m.c_fc.weight, m.c_fc.bias, m.c_proj.weight, m.c_proj.bias]
    weights = [w.detach() for w in weights]
    cache_k, cache_v = filled_cache(cfg, 2)
    torch.library.opcheck(torch.ops.gpt.decode_block.default, (torch.randn(2, 60), weights, cache_k, cache_v, 9),
                          test_utils=("test_schema", "test_faketensor"))
