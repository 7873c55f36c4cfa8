"""Generation speed at GPT-2 124M (random weights, one seed, the same in every candidate): batch 1,
a 16-token prompt, 128 new tokens, top_k 50, temperature 0.8.

First group: gpt.generate (KV cache) on the ext and torch backends, the book's
llms_from_scratch.ch05.generate (no cache: re-runs the whole context every token), and Hugging
Face's GPT2LMHeadModel.generate (KV cache), all float32. extra_info holds tokens_per_s and
ms_per_token (median round), tokens_per_s_best (fastest round), and a memory-bandwidth floor
measured before every round: read_GBps (a sum over 512 MB), ideal_ms_per_token (the stored
weights read once per token, the tied head once, at that bandwidth) and x_floor = the median
over rounds of (ms/token) / (that round's ideal).

The other tests each time their candidates round-robin in one benchmark (so a ratio compares
rounds taken side by side on a shared machine) and report per candidate in extra_info:
- precisions: float32 / bfloat16 / int8 weights (gpt.quantize) on the ext kernels, and
  llama.cpp (llama-cpp-python, same process, 2 threads) on f32 / bf16 / q8_0 GGUFs of the same
  weights written by gpt.export_gguf, when both are installed; each against its own floor;
- prefill: a 256-token prompt through the model (the KV cache filled), same candidates;
- gpt2-xl shape (random weights, 48 x 1600): int8 against float32 decode;
- batch: B = 8 against B = 1 rows decoded together, aggregate tokens/s.

    pytest bench/bench_generate.py --benchmark-only

The numbers are noisy when other processes share the cores.
"""
import copy
import functools
import os
import statistics
import time

import pytest
import torch

import gpt

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

PROMPT, NEW, TOP_K, TEMPERATURE = 16, 128, 50, 0.8
GROUP = f"generate 124M B=1 prompt={PROMPT} new={NEW} top_k={TOP_K} T={TEMPERATURE}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(1234)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    folder = tmp_path_factory.mktemp("gpt2-124M-random")
    hf.save_pretrained(folder)
    ours = gpt.GPT.from_pretrained(str(folder)).eval()
    book = book_from_hf(hf).eval()
    prompt = torch.randint(50257, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # all three are the same network
        ref = hf(prompt).logits
        torch.testing.assert_close(ours(prompt), ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(book(prompt), ref, rtol=0, atol=1e-4)
    return {"hf": hf, "gpt": ours, "book": book, "prompt": prompt}


def book_from_hf(hf):
    """The book's GPTModel with HF's weights: Conv1D weights are (in, out), nn.Linear's (out, in);
    c_attn splits into W_query / W_key / W_value."""
    from llms_from_scratch.ch04 import GPTModel

    c = hf.config
    book = GPTModel({"vocab_size": c.vocab_size, "context_length": c.n_positions, "emb_dim": c.n_embd,
                     "n_heads": c.n_head, "n_layers": c.n_layer, "drop_rate": 0.0, "qkv_bias": True})
    sd = hf.state_dict()
    new = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "final_norm.scale": sd["transformer.ln_f.weight"], "final_norm.shift": sd["transformer.ln_f.bias"],
           "out_head.weight": sd["lm_head.weight"]}
    for i in range(c.n_layer):
        h, b = f"transformer.h.{i}.", f"trf_blocks.{i}."
        qkv_w = sd[h + "attn.c_attn.weight"].t().chunk(3, dim=0)
        qkv_b = sd[h + "attn.c_attn.bias"].chunk(3, dim=0)
        for name, w, bias in zip(("W_query", "W_key", "W_value"), qkv_w, qkv_b):
            new[f"{b}att.{name}.weight"], new[f"{b}att.{name}.bias"] = w, bias
        new.update({
            b + "att.out_proj.weight": sd[h + "attn.c_proj.weight"].t(), b + "att.out_proj.bias": sd[h + "attn.c_proj.bias"],
            b + "norm1.scale": sd[h + "ln_1.weight"], b + "norm1.shift": sd[h + "ln_1.bias"],
            b + "norm2.scale": sd[h + "ln_2.weight"], b + "norm2.shift": sd[h + "ln_2.bias"],
            b + "ff.layers.0.weight": sd[h + "mlp.c_fc.weight"].t(), b + "ff.layers.0.bias": sd[h + "mlp.c_fc.bias"],
            b + "ff.layers.2.weight": sd[h + "mlp.c_proj.weight"].t(), b + "ff.layers.2.bias": sd[h + "mlp.c_proj.bias"],
        })
        new[b + "att.mask"] = book.trf_blocks[i].att.mask
    book.load_state_dict({k: v.contiguous().clone() for k, v in new.items()}, strict=True)
    return book


def stored_bytes(model):
    """Bytes of the model's tensors as stored (a tied head and embedding counted once): what one
    decode step reads, give or take one row of each embedding and the KV cache."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.fixture(scope="module")
def read_bandwidth():
    """GB/s of reading memory (a sum over 512 MB of float32, median of 3): measured afresh before
    every round, since this machine's bandwidth drifts by a third within minutes."""
    src = torch.ones(512 * 2**20 // 4)

    def measure():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            src.sum()
            times.append(time.perf_counter() - t0)
        return src.numel() * 4 / statistics.median(times) / 1e9

    return measure


@pytest.fixture(scope="module")
def floor(models, read_bandwidth):
    """The float32 124M's bandwidth floor: ms/token of reading its weights once per token."""
    weight_bytes = stored_bytes(models["gpt"])

    def ideal_ms_per_token():
        gbps = read_bandwidth()
        return weight_bytes / (gbps * 1e9) * 1e3, gbps

    ideal_ms_per_token.weight_MB = round(weight_bytes / 1e6, 1)
    return ideal_ms_per_token


def run(benchmark, floor, fn, rounds):
    """Times `rounds` full generations (after a warm-up generation of a few tokens, done by the
    caller), each after a fresh floor measurement (untimed)."""
    times, floors = [], []

    def measure_floor():
        floors.append(floor())

    def timed():
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        return out

    out = benchmark.pedantic(timed, setup=measure_floor, rounds=rounds, iterations=1)
    assert out.shape == (1, PROMPT + NEW)
    ms_per_token = [t / NEW * 1e3 for t in times]
    info = benchmark.extra_info
    info["weight_MB"] = floor.weight_MB
    info["read_GBps"] = round(statistics.median(g for _, g in floors), 2)
    info["ideal_ms_per_token"] = round(statistics.median(f for f, _ in floors), 3)
    info["tokens_per_s"] = round(NEW / statistics.median(times), 2)
    info["tokens_per_s_best"] = round(NEW / min(times), 2)  # the least disturbed round
    info["ms_per_token"] = round(statistics.median(ms_per_token), 3)
    # each round against the floor measured just before it
    info["x_floor"] = round(statistics.median(ms / f for ms, (f, _) in zip(ms_per_token, floors)), 2)


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("backend", ["ext", "torch"])
def test_gpt_generate(benchmark, request, models, floor, backend):
    if backend == "ext":
        request.getfixturevalue("ext")  # fails (does not skip) when gpt_ext does not load
    with gpt.backend(backend):
        gpt.generate(models["gpt"], models["prompt"], 4, temperature=TEMPERATURE, top_k=TOP_K)  # warm-up
        g = torch.Generator().manual_seed(0)
        run(benchmark, floor, lambda: gpt.generate(models["gpt"], models["prompt"], NEW, temperature=TEMPERATURE,
                                                   top_k=TOP_K, generator=g), rounds=5)


@pytest.mark.benchmark(group=GROUP)
def test_hf_generate(benchmark, models, floor):
    hf, prompt = models["hf"], models["prompt"]

    def fn(n=NEW):
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=TOP_K,
                               temperature=TEMPERATURE, max_new_tokens=n, min_new_tokens=n,
                               pad_token_id=hf.config.eos_token_id, use_cache=True)

    fn(4)  # warm-up
    torch.manual_seed(0)
    run(benchmark, floor, fn, rounds=5)


@pytest.mark.benchmark(group=GROUP)
def test_book_generate(benchmark, models, floor):
    from llms_from_scratch.ch05 import generate

    book, prompt = models["book"], models["prompt"]
    torch.manual_seed(0)
    run(benchmark, floor, lambda: generate(book, prompt, NEW, context_size=1024, temperature=TEMPERATURE,
                                           top_k=TOP_K), rounds=2)


# --- bfloat16 and int8 weights, llama.cpp, prefill, gpt2-xl, batch: candidates round-robin ---

PRECISIONS = ("float32", "bfloat16", "int8")
LLAMA_QUANT = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}  # llama.cpp's file of each precision


def stored_as(model, dtype):
    """A copy of model with its matrices stored in dtype, sharing the float32 tensors it keeps."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}  # deepcopy: no tensor copied
    return gpt.quantize(copy.deepcopy(model, shared), dtype)


def round_robin(benchmark, candidates, read_bandwidth, tokens, rounds=3):
    """Times candidates {name: (fn, stored bytes or None)} once each per round, the order rotated
    every round, after measuring the read bandwidth. extra_info[name]: tokens_per_s (tokens per
    call / median time) and, given its bytes, x_floor (median over rounds of time per token over
    stored bytes / that round's bandwidth). Returns {name: tokens_per_s}."""
    names, times, gbps = list(candidates), {name: [] for name in candidates}, []

    def one_round():
        gbps.append(read_bandwidth())
        k = len(gbps) % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            candidates[name][0]()
            times[name].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    info = benchmark.extra_info
    info["read_GBps"] = round(statistics.median(gbps), 2)
    speed = {}
    for name, (_, nbytes) in candidates.items():
        speed[name] = tokens / statistics.median(times[name])
        info[name] = {"tokens_per_s": round(speed[name], 2)}
        if nbytes:
            floors = [nbytes / (g * 1e9) * tokens for g in gbps]  # seconds, at that round's bandwidth
            info[name]["stored_MB"] = round(nbytes / 1e6, 1)
            info[name]["floor_tokens_per_s"] = round(tokens / statistics.median(floors), 2)
            info[name]["x_floor"] = round(statistics.median(t / f for t, f in zip(times[name], floors)), 2)
    return speed


@pytest.fixture(scope="module")
def stored(models):
    return {dtype: stored_as(models["gpt"], dtype) for dtype in PRECISIONS}


@pytest.fixture(scope="module")
def llama(models, tmp_path_factory):
    """{dtype: llama_cpp.Llama} on GGUFs of the same weights, or {} (why in extra_info) when
    llama-cpp-python or gpt.export_gguf is missing."""
    try:
        import llama_cpp
    except ImportError as e:
        return {"why": f"llama-cpp-python not installed ({e})"}
    if not hasattr(gpt, "export_gguf"):
        return {"why": "gpt.export_gguf missing"}
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for dtype, quant in LLAMA_QUANT.items():
        path = folder / f"gpt2-124M-{quant}.gguf"
        gpt.export_gguf(models["gpt"], str(path), quant)
        out[dtype] = llama_cpp.Llama(model_path=str(path), n_threads=2, n_threads_batch=2, n_ctx=512,
                                     logits_all=False, verbose=False)
    return out


def llama_generate(llm, prompt, n):
    """llama.cpp's decode loop as llama-cpp-python runs it: the prompt in one batch, then one
    token at a time, top_k 50, temperature 0.8 (its other samplers off)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for i in range(n):
        out.append(llm.sample(top_k=TOP_K, top_p=1.0, min_p=0.0, temp=TEMPERATURE))
        if i < n - 1:
            llm.eval([out[-1]])
    return out


def llama_file_bytes(llm):
    return os.path.getsize(llm.model_path)


@pytest.mark.benchmark(group="generate 124M B=1 per precision, llama.cpp, round-robin")
def test_precisions(benchmark, ext, models, stored, llama, read_bandwidth):
    prompt = models["prompt"]
    candidates = {}
    for dtype, model in stored.items():
        gpt.generate(model, prompt, 4, temperature=TEMPERATURE, top_k=TOP_K)  # warm-up
        g = torch.Generator().manual_seed(0)
        candidates[f"gpt {dtype}"] = (functools.partial(gpt.generate, model, prompt, NEW, temperature=TEMPERATURE,
                                                        top_k=TOP_K, generator=g), stored_bytes(model))
    for dtype, llm in llama.items():
        if dtype != "why":
            llama_generate(llm, prompt[0].tolist(), 4)
            candidates[f"llama.cpp {LLAMA_QUANT[dtype]}"] = (
                functools.partial(llama_generate, llm, prompt[0].tolist(), NEW), llama_file_bytes(llm))
    speed = round_robin(benchmark, candidates, read_bandwidth, NEW)
    info = benchmark.extra_info
    info["bf16_over_fp32"] = round(speed["gpt bfloat16"] / speed["gpt float32"], 2)
    info["int8_over_fp32"] = round(speed["gpt int8"] / speed["gpt float32"], 2)
    if "why" in llama:
        info["llama_cpp"] = "skipped: " + llama["why"]
    else:
        info["bf16_over_llama_bf16"] = round(speed["gpt bfloat16"] / speed["llama.cpp bf16"], 2)
        info["int8_over_llama_q8_0"] = round(speed["gpt int8"] / speed["llama.cpp q8_0"], 2)
        info["fp32_over_llama_f32"] = round(speed["gpt float32"] / speed["llama.cpp f32"], 2)


PREFILL = 256


@pytest.mark.benchmark(group=f"prefill {PREFILL} tokens 124M, round-robin")
def test_prefill(benchmark, ext, models, stored, llama, read_bandwidth):
    ids = torch.randint(50257, (1, PREFILL), generator=torch.Generator().manual_seed(1))

    def prefill(model):
        with torch.inference_mode():
            return model(ids, kv_cache=model.new_kv_cache(1), last_only=True)[:, -1]

    def llama_prefill(llm):
        llm.reset()
        llm.eval(ids[0].tolist())

    candidates = {f"gpt {dtype}": (functools.partial(prefill, model), None) for dtype, model in stored.items()}
    for dtype, llm in llama.items():
        if dtype != "why":
            candidates[f"llama.cpp {LLAMA_QUANT[dtype]}"] = (functools.partial(llama_prefill, llm), None)
    for fn, _ in candidates.values():
        fn()  # warm-up
    speed = round_robin(benchmark, candidates, read_bandwidth, PREFILL)
    if "why" not in llama:
        benchmark.extra_info["bf16_over_llama_bf16"] = round(speed["gpt bfloat16"] / speed["llama.cpp bf16"], 2)


@pytest.mark.benchmark(group="generate gpt2-xl shape B=1, int8 vs float32, round-robin")
def test_gpt2_xl_int8_vs_float32(benchmark, ext, read_bandwidth):
    torch.manual_seed(0)
    fp32 = gpt.GPT(gpt.GPTConfig(**gpt.MODEL_PRESETS["gpt2-xl"])).eval()
    int8 = stored_as(fp32, "int8")
    prompt, new = torch.randint(50257, (1, PROMPT)), 32
    candidates = {}
    for dtype, model in (("float32", fp32), ("int8", int8)):
        gpt.generate(model, prompt, 2)
        candidates[dtype] = (functools.partial(gpt.generate, model, prompt, new, temperature=TEMPERATURE,
                                               top_k=TOP_K), stored_bytes(model))
    speed = round_robin(benchmark, candidates, read_bandwidth, new)
    benchmark.extra_info["int8_over_fp32"] = round(speed["int8"] / speed["float32"], 2)


@pytest.mark.benchmark(group="generate 124M, B=8 vs B=1 rows together, round-robin")
@pytest.mark.parametrize("dtype", PRECISIONS)
def test_batch(benchmark, ext, models, stored, read_bandwidth, dtype):
    model, new = stored[dtype], 64
    candidates = {}
    for B in (1, 8):
        prompt = models["prompt"].expand(B, -1)
        gpt.generate(model, prompt, 2)
        candidates[f"B={B}"] = (functools.partial(gpt.generate, model, prompt, new, temperature=TEMPERATURE,
                                                  top_k=TOP_K), None)
    speed = round_robin(benchmark, candidates, read_bandwidth, new)
    benchmark.extra_info["B=8"]["tokens_per_s"] *= 8  # aggregate: 8 rows per step
    benchmark.extra_info["aggregate_B8_over_B1"] = round(8 * speed["B=8"] / speed["B=1"], 2)
