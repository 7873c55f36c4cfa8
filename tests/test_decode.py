"""gpt::decode_blocks (a model's blocks, one new token per row, KV cache) against Block.forward's torch
path (nn.Linear, LayerNorm, scaled_dot_product_attention), on random weights with non-zero
biases and awkward sizes: head sizes not a multiple of any vector width, matrix heights not a
multiple of the kernel's 4-row and 64-row blocks, widths not a multiple of 16 or 32 (a partial
int8 block), batch > 1 (and > 4, the kernel's batch group), the first and the last cache slot.

Weights stored bfloat16 are compared with the torch path of the same block holding the
dequantized float32 weights, each matrix's input rounded to bf16 as the kernel rounds it; int8
weights with the torch path of the stored block (which quantizes the activations per block of 32
as the kernel does): both sides then compute the same function, so the tolerance is float32's
(1e-5), not the rounding's (see assert_same_step for where bf16 roundings loosen it to 1e-4); with
a bfloat16 KV cache (what bf16 and int8 weights decode with) both sides read the same rounded cache.
Every test runs on the CPU's best path (bf16 and int8 products of 5 or more rows on AMX tiles
where present), on AVX-512 without AMX (GPT_CPU_ISA=avx512), on AVX2 (GPT_CPU_ISA=avx2) and on the
generic one (GPT_CPU_ISA=generic)."""
import copy

import pytest
import torch

import gpt


def random_block(n_head, n_embd, block_size, qkv_bias, scale=1.0, seed=0, config_cls=gpt.GPTConfig, **fields):
    torch.manual_seed(seed)
    cfg = config_cls(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=block_size, qkv_bias=qkv_bias, **fields)
    block = gpt.Block(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, scale / n_embd**0.5 if p.dim() == 2 else 0.5)
    return cfg, block


class Int8Reference(torch.nn.Module):
    """An int8 QuantizedLinear as the kernel computes it at any number of rows: the activations
    quantized per block of 32 too (gpt.int8_linear_reference)."""

    def __init__(self, quantized):
        super().__init__()
        self.quantized = quantized

    def forward(self, x):
        q = self.quantized
        return gpt.int8_linear_reference(x.reshape(-1, x.size(-1)), q.qweight, q.scale, q.bias).view(*x.shape[:-1], -1)


def stored_and_reference(block, dtype):
    """(block with its matrices stored in dtype, its reference): for bfloat16, a float32 block holding
    the dequantized weights whose matrices round their input to bf16 (what the kernel multiplies);
    for int8, the stored block with each matrix an Int8Reference. (The stored block's own torch path
    would not do: above a few rows -- 8 for bf16, 16 or 32 for int8 -- it is the prompt's bf16 GEMM,
    whose output is bf16.)"""
    stored = copy.deepcopy(block)
    if dtype != "float32":
        gpt.quantize_linears(stored, dtype)
    if dtype == "int8":
        return stored, gpt.swap_modules(copy.deepcopy(stored), gpt.QuantizedLinear, Int8Reference)
    reference = copy.deepcopy(block)
    with torch.no_grad():
        for (name, linear), (_, q) in zip(reference.named_modules(), stored.named_modules()):
            if isinstance(q, gpt.QuantizedLinear):
                linear.weight.copy_(q.weight)
                linear.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    return stored, reference


def filled_cache(cfg, B, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (B, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def assert_same_step(got, ref, got_caches, ref_caches, cache_dtype, dtype):
    """The kernel's output and written caches against the torch path's: float32's tolerance with a
    float32 cache and float32 or int8 weights. With a bfloat16 cache, this token's k, v (equal to
    ~1e-6 on both sides) may round to neighbouring bfloat16 values (one unit in the last place),
    which moves the output ~1e-5; with bfloat16 weights each product's input is rounded to bf16 on
    both sides, and an input a float32 ulp apart (the attention's output, a GELU) may likewise round
    to the neighbouring bf16 value (seen: head size 144, 1e-4)."""
    tol = 1e-5 if cache_dtype == torch.float32 and dtype != "bfloat16" else 1e-4
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    ulp = 0 if cache_dtype == torch.float32 else 2**-7  # one unit in the last place, relative to either value
    for (got_k, got_v), (ref_k, ref_v) in zip(got_caches, ref_caches, strict=True):
        assert got_k.dtype == got_v.dtype == cache_dtype
        torch.testing.assert_close(got_k, ref_k, rtol=ulp, atol=1e-5)  # this token's k, v written at pos
        torch.testing.assert_close(got_v, ref_v, rtol=ulp, atol=1e-5)


def run_block(block, cfg, x, pos, backend, cache_dtype=torch.float32):
    cache = filled_cache(cfg, x.size(0), dtype=cache_dtype)
    with gpt.backend(backend), torch.inference_mode():
        return (gpt.run_blocks([block], x, [cache], pos), *cache)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("n_head,n_embd,B,pos,qkv_bias", [
    (1, 16, 1, 1, True),     # one head; the smallest cache read; half an int8 block
    (3, 60, 3, 7, False),    # head size 20; 3C = 180 rows: a partial 4-row group and 64-row chunk
    (4, 64, 2, 31, True),    # the last cache slot
    (12, 768, 1, 100, True),  # GPT-2 124M's block
    (5, 85, 6, 18, False),   # odd everything: head size 17, 4C = 340, K = 85 (a 21-wide int8 block); B = 4 + 2
    (3, 96, 17, 5, True),    # K = 96, 384: bf16 (and int8's K = 384) on AMX tiles, rows of x 16 + 1 (8 + 8 + 1)
    (1, 144, 2, 20, True),   # head size 144: attention past the AVX-512 kernel's 128 takes the generic loops
])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_decode_block_matches_torch(ext, product_isa, dtype, n_head, n_embd, B, pos, qkv_bias, cache_dtype):
    cfg, block = random_block(n_head, n_embd, 32 if n_embd < 768 else 128, qkv_bias)
    stored, reference = stored_and_reference(block, dtype)
    x = torch.randn(B, 1, n_embd)
    ref, ref_k, ref_v = run_block(reference, cfg, x, pos, "torch", cache_dtype)
    got, got_k, got_v = run_block(stored, cfg, x, pos, "ext", cache_dtype)
    assert_same_step(got, ref, [(got_k, got_v)], [(ref_k, ref_v)], cache_dtype, dtype)
    assert not torch.equal(got_k[:, :, pos], filled_cache(cfg, B, dtype=cache_dtype)[0][:, :, pos])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_decode_block_large_values(ext, product_isa, dtype):
    """Large weights and inputs: attention scores in the hundreds (a near one-hot softmax), GELU
    far out on both tails."""
    cfg, block = random_block(4, 64, 32, True, scale=8.0)
    stored, reference = stored_and_reference(block, dtype)
    x = 50 * torch.randn(2, 1, 64)
    ref = run_block(reference, cfg, x, 20, "torch")[0]
    got = run_block(stored, cfg, x, 20, "ext")[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", [(5, 85, 5), (2, 64, 8)])
def test_decode_blocks_runs_a_stack_of_blocks(ext, product_isa, dtype, shape):
    """Three blocks with their own weights and caches in one call: each layer's output feeds the
    next, each writes its own cache (awkward sizes: head size 17, B = 5; or C = 64, B = 8: int8 on AMX
    tiles where present)."""
    n_head, C, B = shape
    cfg = random_block(n_head, C, 32, True)[0]
    blocks = [random_block(n_head, C, 32, i != 1, seed=i)[1] for i in range(3)]  # one without qkv bias
    pairs = [stored_and_reference(b, dtype) for b in blocks]
    cache_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    x = torch.randn(B, 1, C)
    results = {}
    for backend, side in (("torch", 1), ("ext", 0)):
        caches = [filled_cache(cfg, B, seed=10 + i, dtype=cache_dtype) for i in range(3)]
        with gpt.backend(backend), torch.inference_mode():
            results[backend] = gpt.run_blocks([p[side] for p in pairs], x, caches, 12), caches
    (got, got_caches), (ref, ref_caches) = results["ext"], results["torch"]
    assert_same_step(got, ref, got_caches, ref_caches, cache_dtype, dtype)
    assert not torch.allclose(got, x, atol=1e-2)  # the blocks did something


def test_generate_takes_the_fused_step_only_when_it_applies(ext, monkeypatch):
    calls = []
    fused = gpt.decode_blocks
    monkeypatch.setattr(gpt, "decode_blocks", lambda *a: calls.append(a[3]) or fused(*a))
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    prompt = torch.randint(50257, (1, 5))
    gpt.generate(model, prompt, 4)
    assert calls == [5, 6, 7]  # both blocks in one call per decode step (the prompt runs unfused)
    calls.clear()
    with torch.no_grad():  # with autograd recording, or in training mode, the torch path runs
        cache = model.new_kv_cache(1)
        model(prompt, kv_cache=cache)
        with torch.enable_grad():
            model(prompt[:, :1], kv_cache=cache, pos=5)
        model.train()
        model(prompt[:, :1], kv_cache=cache, pos=5)
    assert calls == []


def test_the_weights_list_is_gathered_once_per_generation(ext, monkeypatch):
    gathered = []
    real = gpt.decode_weights
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    ours = lambda block: any(block is b for b in model.h)  # (not the kernels' first-use check)
    monkeypatch.setattr(gpt, "decode_weights", lambda block: (ours(block) and gathered.append(block)) or real(block))
    prompt = torch.randint(50257, (1, 5))
    before = gpt.generate(model, prompt, 6)
    assert gathered == list(model.h)  # once per block, not once per token
    gpt.quantize(model, "int8")  # new weights, a new generation: gathered again, and used
    after = gpt.generate(model, prompt, 6)
    with gpt.backend("torch"):
        assert torch.equal(after, gpt.generate(model, prompt, 6))
    assert gathered == list(model.h) * 2 and before.shape == after.shape


def test_a_block_feature_the_kernel_lacks_falls_back_with_the_same_tokens(ext, monkeypatch):
    """A GPTConfig field the kernel does not know (here a made-up `rotary`) at a non-default value
    sends generation to Block.forward's torch path: no fused call, the torch backend's tokens."""
    import dataclasses

    @dataclasses.dataclass
    class RotaryConfig(gpt.GPTConfig):
        rotary: bool = False

    calls = []
    fused = gpt.decode_blocks
    monkeypatch.setattr(gpt, "decode_blocks", lambda *a: calls.append(a[3]) or fused(*a))
    prompt = torch.randint(50257, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = {}
    for rotary in (False, True):
        torch.manual_seed(0)
        model = gpt.GPT(RotaryConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, rotary=rotary)).eval()
        tokens[rotary] = gpt.generate(model, prompt, 6)
        assert bool(calls) is not rotary  # fused while the config is the kernel's, not once after
        calls.clear()
        with gpt.backend("torch"):
            assert torch.equal(gpt.generate(model, prompt, 6), tokens[rotary])
    assert torch.equal(tokens[False], tokens[True])  # `rotary` does nothing in this Block


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_opcheck(ext, dtype):
    cfg, block = random_block(3, 60, 32, True)
    stored, _ = stored_and_reference(block, dtype)
    weights = [w.detach() for w in gpt.decode_weights(stored)]
    cache_k, cache_v = filled_cache(cfg, 2, dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
    torch.library.opcheck(torch.ops.gpt.decode_blocks.default, (torch.randn(2, 60), weights, [cache_k, cache_v], 9),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_weights_are_refused(ext):
    cfg, block = random_block(2, 32, 16, True)
    stored, _ = stored_and_reference(block, "int8")
    weights = [w.detach() for w in gpt.decode_weights(stored)]
    cache = filled_cache(cfg, 1)
    x = torch.randn(1, 32)
    no_scale = list(weights)
    no_scale[3] = torch.empty(0)  # c_attn's scale
    with pytest.raises(RuntimeError, match="needs float16 scales"):
        torch.ops.gpt.decode_blocks(x, no_scale, list(cache), 3)
    with pytest.raises(RuntimeError, match="expected 16 weight tensors and a cache_k, cache_v per layer"):
        torch.ops.gpt.decode_blocks(x, weights[:12], list(cache), 3)
    with pytest.raises(RuntimeError, match="expected 16 weight tensors and a cache_k, cache_v per layer"):
        torch.ops.gpt.decode_blocks(x, weights, [*cache, *cache], 3)  # two layers' caches, one layer's weights
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        torch.ops.gpt.decode_blocks(x, weights, [cache[0], cache[1].bfloat16()], 3)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16"):
        torch.ops.gpt.decode_blocks(x, weights * 2, [*cache, *(c.bfloat16() for c in cache)], 3)
    with pytest.raises(RuntimeError, match="every layer's cache has one shape"):
        torch.ops.gpt.decode_blocks(x, weights * 2, [*cache, *(c[:, :, :8].contiguous() for c in cache)], 3)


@pytest.mark.parametrize("dtype,cache_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                               ("int8", torch.bfloat16)])
def test_the_kv_cache_is_bfloat16_for_bfloat16_and_int8_weights(ext, dtype, cache_dtype):
    torch.manual_seed(0)
    model = gpt.quantize(gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval(), dtype)
    assert all(k.dtype == v.dtype == cache_dtype for k, v in model.new_kv_cache(2))
    prompt = torch.randint(50257, (2, 5))
    tokens = gpt.generate(model, prompt, 8)
    with gpt.backend("torch"):  # the torch path reads the same cache
        assert torch.equal(gpt.generate(model, prompt, 8), tokens)
