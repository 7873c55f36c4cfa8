"""Importing GPT-2 weights: a Hugging Face folder / .safetensors file and the book's GPTModel state
dict give the same logits and greedy continuations as the model they came from; broken or hostile
files are refused with one clear GPTError line; the presets have GPT-2's parameter counts."""
import os
import pickle
import shlex
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gpt

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

V = 50257


def _randomize_(module, seed):
    """Every parameter random and non-trivial (LayerNorm scales away from 1, shifts and biases
    away from 0), so a mis-mapped or dropped tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("ln" in name or "norm" in name) and ("weight" in name or "scale" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "wte" in name or "tok_emb" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))  # logits ~ N(0, 1)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _hf_model(seed=0, tie=True, n_embd=64, n_head=4):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=n_head, n_embd=n_embd, n_positions=128, vocab_size=V,
                     tie_word_embeddings=tie)
    model = GPT2LMHeadModel(cfg).eval()
    _randomize_(model, seed)
    if not tie:
        assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    return model


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    for B, T in [(1, 1), (3, 1), (2, 7), (1, 128), (2, 128), (4, 33)]:
        yield torch.randint(V, (B, T), generator=g)


def _assert_logits_match(ours, hf_forward, block_size=128):
    for idx in _batches():
        if idx.size(1) > block_size:
            idx = idx[:, :block_size]
        with torch.no_grad():
            expected = hf_forward(idx)
            got = ours(idx)
        assert got.shape == expected.shape == (idx.size(0), idx.size(1), V)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    model = _hf_model(seed=0)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(folder)  # safetensors
    assert (folder / "model.safetensors").exists()
    return model, folder


BACKENDS = ["torch_backend", "ext"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_folder_logits_match(hf_folder, backend, request):
    request.getfixturevalue(backend)
    hf, folder = hf_folder
    ours = gpt.GPT.from_pretrained(str(folder)).eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 4, 64, 128, V)
    assert c.qkv_bias and c.tie_weights
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


def test_safetensors_file_alone(tmp_path):
    # No config.json beside it: n_head is inferred as n_embd // 64, so use 64-wide heads.
    hf = _hf_model(seed=1, n_embd=128, n_head=2)
    hf.save_pretrained(tmp_path / "folder")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "folder" / "model.safetensors", alone / "gpt2-tiny.safetensors")
    ours = gpt.GPT.from_pretrained(str(alone / "gpt2-tiny.safetensors")).eval()
    assert (ours.config.n_head, ours.config.n_embd) == (2, 128)
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


def test_safetensors_file_next_to_its_config(hf_folder):
    # n_head 4 (16-wide heads) can only come from config.json next to the file.
    hf, folder = hf_folder
    ours = gpt.GPT.from_pretrained(str(folder / "model.safetensors")).eval()
    assert ours.config.n_head == 4
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


def test_hf_untied_head(tmp_path):
    hf = _hf_model(seed=2, tie=False)
    hf.save_pretrained(tmp_path)
    ours = gpt.GPT.from_pretrained(str(tmp_path)).eval()
    assert not ours.config.tie_weights
    assert ours.lm_head.weight.data_ptr() != ours.wte.weight.data_ptr()
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


def test_hf_pytorch_model_bin(tmp_path):
    hf = _hf_model(seed=3)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path)
    ours = gpt.GPT.from_pretrained(str(tmp_path)).eval()
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_hf(hf_folder, backend, request):
    request.getfixturevalue(backend)
    hf, folder = hf_folder
    ours = gpt.GPT.from_pretrained(str(folder)).eval()
    g = torch.Generator().manual_seed(7)
    for B in (1, 2):
        prompt = torch.randint(V, (B, 16), generator=g)
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=40, min_new_tokens=40, eos_token_id=None,
                               pad_token_id=0)
        got = gpt.generate(ours, prompt, 40, temperature=0.0)
        assert expected.shape == (B, 56)
        assert got.tolist() == expected.tolist()


# --- the book's GPTModel --------------------------------------------------------------

def _book_model(qkv_bias, seed):
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(seed)
    cfg = {"vocab_size": V, "context_length": 64, "emb_dim": 128, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": qkv_bias}
    model = GPTModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_book_state_dict_logits_match(tmp_path, qkv_bias):
    book = _book_model(qkv_bias, seed=10 + qkv_bias)
    path = tmp_path / "book.pth"
    torch.save(book.state_dict(), path)
    ours = gpt.GPT.from_pretrained(str(path)).eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (2, 2, 128, 64)
    assert c.qkv_bias == qkv_bias and not c.tie_weights
    _assert_logits_match(ours, book, block_size=64)


# --- refusals --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_state(hf_folder):
    return load_file(hf_folder[1] / "model.safetensors")


def _refused(path):
    with pytest.raises(gpt.GPTError) as e:
        gpt.GPT.from_pretrained(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.strip()
    return msg


def test_missing_key(tmp_path, hf_state):
    sd = dict(hf_state)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    save_file(sd, tmp_path / "m.safetensors")
    msg = _refused(tmp_path / "m.safetensors")
    assert "missing" in msg and "h.1.mlp.c_fc.bias" in msg


def test_extra_key(tmp_path, hf_state):
    sd = dict(hf_state)
    sd["transformer.h.0.attn.rotary"] = torch.zeros(3)
    save_file(sd, tmp_path / "m.safetensors")
    msg = _refused(tmp_path / "m.safetensors")
    assert "unexpected" in msg and "h.0.attn.rotary" in msg


def test_wrong_shape(tmp_path, hf_state):
    sd = dict(hf_state)
    sd["transformer.h.0.mlp.c_fc.bias"] = torch.zeros(100)
    save_file(sd, tmp_path / "m.safetensors")
    msg = _refused(tmp_path / "m.safetensors")
    assert "shape" in msg and "h.0.mlp.c_fc.bias" in msg


def test_book_state_dict_missing_key(tmp_path):
    sd = _book_model(True, seed=12).state_dict()
    del sd["trf_blocks.1.ff.layers.2.bias"]
    torch.save(sd, tmp_path / "book.pth")
    msg = _refused(tmp_path / "book.pth")
    assert "missing" in msg and "h.1.mlp.c_proj.bias" in msg


def test_not_gpt2(tmp_path):
    save_file({"foo": torch.zeros(2, 2)}, tmp_path / "foo.safetensors")
    msg = _refused(tmp_path / "foo.safetensors")
    assert "GPT-2" in msg


def test_no_weights_in_folder(tmp_path):
    msg = _refused(tmp_path)
    assert "model.safetensors" in msg


def test_nonexistent_path(tmp_path):
    msg = _refused(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in msg


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_truncated_file(tmp_path, hf_folder, fmt):
    if fmt == "safetensors":
        data = (hf_folder[1] / "model.safetensors").read_bytes()
    else:
        torch.save(_book_model(False, seed=13).state_dict(), tmp_path / "full.pth")
        data = (tmp_path / "full.pth").read_bytes()
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    msg = _refused(path)
    assert "cannot read" in msg or "truncated" in msg


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_payload_would_run_if_unpickled(tmp_path):
    """The payload below is live: unpickling it without weights_only runs the command."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle", "function_value"])
def test_pickled_code_is_refused_not_run(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if how == "torch_save":
        sd = _book_model(False, seed=14).state_dict()
        sd["trf_blocks.0.att.mask"] = _Payload(marker)
        torch.save(sd, path)
    elif how == "raw_pickle":
        path.write_bytes(pickle.dumps({"wte.weight": _Payload(marker)}, protocol=2))
    else:
        torch.save({"wte.weight": torch.zeros(2), "hook": os.system}, path)
    msg = _refused(path)
    assert not marker.exists(), "the pickled payload was executed"
    assert "pickle" in msg or "cannot read" in msg


# --- parameter counts -------------------------------------------------------------------

@pytest.mark.parametrize("qkv_bias,tie,expected", [
    (True, True, 124_439_808), (True, False, 163_037_184),
    (False, True, 124_412_160), (False, False, 163_009_536)])
def test_gpt2_parameter_counts(qkv_bias, tie, expected):
    cfg = dict(gpt.MODEL_PRESETS["gpt2"], qkv_bias=qkv_bias, tie_weights=tie)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**cfg))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == expected
    assert model.num_params() == expected
    assert (model.lm_head.weight is model.wte.weight) == tie


def test_gpt2_count_equals_hf():
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())
        ours = gpt.GPT(gpt.GPTConfig(**gpt.MODEL_PRESETS["gpt2"]))
    hf_count = sum({id(p): p.numel() for p in hf.parameters()}.values())
    assert ours.num_params() == hf_count == 124_439_808
