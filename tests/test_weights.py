"""Importing GPT-2 weights: a Hugging Face folder / .safetensors file and the book's GPTModel state
dict give the same logits and greedy continuations as the model they came from; broken or hostile
files are refused with one clear GPTError line; the presets have GPT-2's parameter counts."""
import os
import pickle
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import gpt

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

V = 50257
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    # No config.json beside it and 128 is no GPT-2 width: the head count is asked for, never guessed.
    hf = _hf_model(seed=1, n_embd=128, n_head=2)
    hf.save_pretrained(tmp_path / "folder")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "folder" / "model.safetensors", alone / "gpt2-tiny.safetensors")
    assert "--n_head" in _refused(alone / "gpt2-tiny.safetensors")
    ours = gpt.GPT.from_pretrained(str(alone / "gpt2-tiny.safetensors"), n_head=2).eval()
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
    assert "--n_head" in _refused(path)  # 128 wide, no config: the head count is asked for
    ours = gpt.GPT.from_pretrained(str(path), n_head=2).eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (2, 2, 128, 64)
    assert c.qkv_bias == qkv_bias and not c.tie_weights
    _assert_logits_match(ours, book, block_size=64)


# --- refusals --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_state(hf_folder):
    return load_file(hf_folder[1] / "model.safetensors")


def _refused(path, **overrides):
    with pytest.raises(gpt.GPTError) as e:
        gpt.GPT.from_pretrained(str(path), **overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip()
    return msg


@pytest.mark.parametrize("key,value,problem", [
    ("transformer.h.1.mlp.c_fc.bias", None, "missing"),  # None: the key removed
    ("transformer.h.0.attn.rotary", torch.zeros(3), "unexpected"),
    ("transformer.h.0.mlp.c_fc.bias", torch.zeros(100), "shape"),
])
def test_mismatched_key_is_named(tmp_path, hf_state, key, value, problem):
    sd = dict(hf_state)
    if value is None:
        del sd[key]
    else:
        sd[key] = value
    save_file(sd, tmp_path / "m.safetensors")
    msg = _refused(tmp_path / "m.safetensors")
    assert problem in msg and key.removeprefix("transformer.") in msg


def test_book_state_dict_missing_key(tmp_path):
    sd = _book_model(True, seed=12).state_dict()
    del sd["trf_blocks.1.ff.layers.2.bias"]
    torch.save(sd, tmp_path / "book.pth")
    msg = _refused(tmp_path / "book.pth", n_head=2)
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


# --- the head count is never guessed ------------------------------------------------------

@pytest.mark.parametrize("n_embd,n_head", [(768, 12), (1024, 16)])
def test_gpt2_widths_imply_64_wide_heads(tmp_path, n_embd, n_head):
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=n_head, n_embd=n_embd, n_positions=4, vocab_size=8))
    save_file({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "w.safetensors")  # no config.json: only the width speaks
    assert gpt.GPT.from_pretrained(str(tmp_path / "w.safetensors")).config.n_head == n_head


def test_book_width_without_config_asks_for_n_head(tmp_path):
    """The issue's case: the book's GPTModel at emb_dim 64 with 4 heads imported with wrong logits."""
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(0)
    book = GPTModel({"vocab_size": 100, "context_length": 16, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
                     "drop_rate": 0.0, "qkv_bias": False}).eval()
    torch.save(book.state_dict(), tmp_path / "book.pth")
    msg = _refused(tmp_path / "book.pth")
    assert "head count" in msg and "--n_head" in msg and "64" in msg
    ours = gpt.GPT.from_pretrained(str(tmp_path / "book.pth"), n_head=4).eval()
    idx = torch.randint(100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=0, atol=1e-5)


# --- nanoGPT's ckpt.pt ---------------------------------------------------------------------

def _nanogpt_checkpoint(hf, bias, compiled, mask_buffers):
    """A ckpt.pt as nanoGPT's train.py writes it, from a HF model: HF's names, nn.Linear layout."""
    c = hf.config
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias") or (not bias and k.endswith(".bias")):
            continue
        sd[k] = v.t().contiguous() if k.endswith(gpt._HF_CONV1D) else v.clone()
        if mask_buffers and k.endswith("attn.c_attn.weight"):  # nanoGPT's causal mask without flash attention
            sd[k.replace("c_attn.weight", "bias")] = torch.tril(torch.ones(c.n_positions, c.n_positions))[None, None]
    if compiled:
        sd = {"_orig_mod." + k: v for k, v in sd.items()}
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions, bias=bias,
                      vocab_size=c.vocab_size, dropout=0.0)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "model_args": model_args,
            "iter_num": 100, "best_val_loss": torch.tensor(2.5), "config": {"batch_size": 12, "dataset": "owt"}}


@pytest.mark.parametrize("bias,compiled,mask_buffers", [(True, False, False), (True, True, True),
                                                         (False, True, False), (False, False, True)])
def test_nanogpt_checkpoint(tmp_path, bias, compiled, mask_buffers):
    hf = _hf_model(seed=20)
    if not bias:  # nanoGPT's bias=False model is HF's with every bias zero
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
    torch.save(_nanogpt_checkpoint(hf, bias, compiled, mask_buffers), tmp_path / "ckpt.pt")
    ours = gpt.GPT.from_pretrained(str(tmp_path / "ckpt.pt")).eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.qkv_bias) == (2, 4, 64, 128, bias)
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


def test_a_training_runs_folder_loads_its_checkpoint(tmp_path):
    """--init_from out/ (a run of ours: its best.pt) and nanoGPT's out/ (its ckpt.pt), as the files."""
    hf = _hf_model(seed=21)
    (tmp_path / "nanogpt_out").mkdir()
    torch.save(_nanogpt_checkpoint(hf, True, False, False), tmp_path / "nanogpt_out" / "ckpt.pt")
    from_folder = gpt.GPT.from_pretrained(str(tmp_path / "nanogpt_out")).eval()
    _assert_logits_match(from_folder, lambda idx: hf(idx).logits)
    (tmp_path / "ours").mkdir()
    gpt.save_checkpoint(str(tmp_path / "ours" / "best.pt"),
                        {"model": from_folder.state_dict(), "config": gpt.dataclasses.asdict(from_folder.config)})
    (tmp_path / "ours" / "ckpt.pt").write_bytes(b"not read: best.pt comes first")
    ours = gpt.GPT.from_pretrained(str(tmp_path / "ours")).eval()
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


# --- the Hugging Face cache ----------------------------------------------------------------

def _fake_hub(hub, repo, hf, with_ref=True):
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123abcd"
    hf.save_pretrained(snapshot)
    if with_ref:
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text("0123abcd")
    return snapshot


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2-medium"])
@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME", "HOME"])
def test_hf_cache_lookup(tmp_path, monkeypatch, hf_folder, name, env):
    hf = hf_folder[0]
    for var in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    hub = {"HF_HUB_CACHE": tmp_path / "hubcache", "HF_HOME": tmp_path / "hfhome" / "hub",
           "HOME": tmp_path / "home" / ".cache" / "huggingface" / "hub"}[env]
    monkeypatch.setenv(env, str(hub if env == "HF_HUB_CACHE" else hub.parent if env == "HF_HOME"
                                else tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    size = name.removeprefix("openai-community/")
    _fake_hub(hub, f"openai-community/{size}", hf, with_ref=env != "HOME")
    ours = gpt.GPT.from_pretrained(name).eval()
    assert ours.config.n_head == 4  # from the snapshot's config.json
    _assert_logits_match(ours, lambda idx: hf(idx).logits)


def test_hf_cache_old_repo_name(tmp_path, monkeypatch, hf_folder):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    _fake_hub(tmp_path / "hub", "gpt2-xl", hf_folder[0])  # cached before the openai-community rename
    assert gpt.GPT.from_pretrained("gpt2-xl").config.n_embd == 64


def test_hf_cache_miss_names_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.chdir(tmp_path)
    msg = _refused("gpt2-large")
    assert "hf download openai-community/gpt2-large" in msg and str(tmp_path / "empty_hub") in msg


# --- checkpoints of ours (issue 14, item 8) ---------------------------------------------------

TINY = ["--n_layer", "2", "--n_head", "3", "--n_embd", "48", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "1", "--device", "cpu", "--dropout", "0.0"]


def _cli(*args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def our_run(tmp_path_factory, shakespeare_text):
    folder = tmp_path_factory.mktemp("run")
    (folder / "play.txt").write_text(shakespeare_text, encoding="utf-8")
    _cli("train", "--data", folder / "play.txt", "--out_dir", folder / "out", "--max_iters", 3,
         "--eval_interval", 3, *TINY)
    return folder


@pytest.mark.parametrize("which", ["best.pt", "ckpt-00000003.pt"])
def test_our_checkpoint_from_pretrained(our_run, which):
    path = our_run / "out" / which
    expected = gpt.model_from_checkpoint(gpt.load_checkpoint(path)).eval()
    ours = gpt.GPT.from_pretrained(str(path)).eval()
    assert ours.config == expected.config and ours.config.n_head == 3
    for k, v in expected.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    idx = torch.randint(50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), expected(idx), rtol=0, atol=0)


def test_our_checkpoint_init_from_cli(our_run, tmp_path):
    best = our_run / "out" / "best.pt"
    args = ["--prompt", "ROMEO:", "--temperature", 0, "--max_new_tokens", 8]
    assert _cli("sample", "--init_from", best, *args).stdout == _cli("sample", "--checkpoint", best, *args).stdout
    proc = _cli("eval", "--init_from", best, "--data", our_run / "play.txt", "--eval_iters", 1)
    assert proc.stdout.startswith("loss ")
    _cli("train", "--init_from", best, "--data", our_run / "play.txt", "--out_dir", tmp_path / "finetune",
         "--max_iters", 1, "--eval_interval", 1, "--batch_size", 2, "--eval_iters", 1, "--device", "cpu")
    tuned = gpt.load_checkpoint(tmp_path / "finetune" / "best.pt")
    assert tuned["config"]["n_head"] == 3 and tuned["config"]["n_embd"] == 48


# --- bad input on the command line: one line, exit 2 --------------------------------------------

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
BAD = [  # (arguments, what the one-line error must mention)
    (["sample", "--init_from", "{tmp}/tf_cut"], "truncated"),
    (["sample", "--init_from", "{tmp}/tf_bad_index"], "TensorFlow checkpoint index"),
    (["sample", "--init_from", "{tmp}/tf_crc"], "crc32c"),
    (["sample", "--init_from", os.path.join(FIXTURES, "tf_gpt2_float16")], "only float32"),
    (["sample", "--init_from", "{tmp}/wide.safetensors"], "--n_head"),
    (["eval", "--init_from", "{tmp}/wide.safetensors"], "--n_head"),
    (["export", "--to", "hf", "{tmp}/x", "--init_from", "{tmp}/wide.safetensors"], "--n_head"),
    (["sample", "--n_head", "4"], "--n_head goes with --init_from"),
    (["sample", "--init_from", "gpt2-medium"], "hf download openai-community/gpt2-medium"),
    (["export", "--to", "hf", "{tmp}/x", "--quant", "q8_0", "--init_from", "{tmp}/tf"], "--quant applies"),
    (["export", "--to", "gguf", "{tmp}/x.gguf", "--init_from", "{tmp}/tf"], "fewer than GPT-2's 50257"),
    (["export", "--to", "gguf", "{tmp}/x.gguf", "--quant", "q4_0"], "invalid choice"),
    (["export", "--to", "hf", "{tmp}/no_dir/file/x", "--init_from", "{tmp}/tf"], "cannot write"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    tf = os.path.join(FIXTURES, "tf_gpt2")
    shutil.copytree(tf, tmp_path / "tf")
    for name in ("tf_cut", "tf_bad_index", "tf_crc"):
        shutil.copytree(tf, tmp_path / name)
    data = (tmp_path / "tf" / "model.ckpt.data-00000-of-00001").read_bytes()
    (tmp_path / "tf_cut" / "model.ckpt.data-00000-of-00001").write_bytes(data[: len(data) // 3])
    (tmp_path / "tf_bad_index" / "model.ckpt.index").write_bytes(b"\0" * 100)
    (tmp_path / "tf_crc" / "model.ckpt.data-00000-of-00001").write_bytes(data[:-8] + bytes(8))
    (tmp_path / "no_dir").mkdir()
    (tmp_path / "no_dir" / "file").write_text("a file, not a folder")
    wide = gpt.GPT(gpt.GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, block_size=8))
    save_file(gpt.hf_state_dict(wide), tmp_path / "wide.safetensors")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty_hub"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "gpt.py"), *[a.format(tmp=tmp_path) for a in args]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt: error:") and message in lines[0], proc.stderr
