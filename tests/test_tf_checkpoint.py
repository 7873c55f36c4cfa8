"""OpenAI's TensorFlow GPT-2 folder read without TensorFlow: fixtures written by real TensorFlow
(tests/fixtures/make_tf_checkpoint.py, 3 layers, 16-wide heads, context 24, vocabulary 300) give the
logits of Hugging Face's GPT2LMHeadModel built from the same arrays; hostile files are one-line errors."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import gpt

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TF_FOLDER = os.path.join(FIXTURES, "tf_gpt2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_spec = importlib.util.spec_from_file_location("make_tf_checkpoint", os.path.join(FIXTURES, "make_tf_checkpoint.py"))
make_tf_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tf_checkpoint)  # its arrays only: TensorFlow is imported in its main()


def test_tensorflow_is_not_imported():
    gpt.GPT.from_pretrained(TF_FOLDER)
    assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def hf_from_arrays():
    """Hugging Face's model from the arrays TensorFlow was given (not from our reader)."""
    hp, arrays = make_tf_checkpoint.HPARAMS, make_tf_checkpoint.gpt2_arrays()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
                                       n_layer=hp["n_layer"], n_head=hp["n_head"])).eval()
    sd = {}
    for name, a in arrays.items():
        n = name.replace("model/", "transformer.").replace("/", ".")
        n = n.replace(".h", ".h.", 1) if n.startswith("transformer.h") else n
        n = {"transformer.wte": "transformer.wte.weight", "transformer.wpe": "transformer.wpe.weight"}.get(n, n)
        n = n[:-2] + {"w": ".weight", "g": ".weight", "b": ".bias"}[n[-1]] if n[-2] == "." else n
        sd[n] = torch.from_numpy(a[0] if a.ndim == 3 else a)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith(".attn.bias") for k in missing), missing
    return model


@pytest.mark.parametrize("where", ["folder", "prefix", "index"])
def test_logits_match_hf(hf_from_arrays, where):
    path = {"folder": TF_FOLDER, "prefix": os.path.join(TF_FOLDER, "model.ckpt"),
            "index": os.path.join(TF_FOLDER, "model.ckpt.index")}[where]
    ours = gpt.GPT.from_pretrained(path).eval()
    c = ours.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (3, 3, 48, 24, 300)
    assert c.qkv_bias and c.tie_weights
    g = torch.Generator().manual_seed(0)
    for B, T in [(1, 1), (2, 7), (3, 24), (1, 13)]:
        idx = torch.randint(300, (B, T), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ours(idx), hf_from_arrays(idx).logits, rtol=0, atol=1e-5)


def test_every_tensor_as_tensorflow_wrote_it():
    weights = gpt.read_tf_checkpoint(os.path.join(TF_FOLDER, "model.ckpt"))
    arrays = make_tf_checkpoint.gpt2_arrays()
    assert sorted(weights) == sorted(arrays)
    for name, a in arrays.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], torch.from_numpy(a)), name


def test_head_count_from_hparams(tmp_path):
    folder = tmp_path / "124M"
    shutil.copytree(TF_FOLDER, folder)
    hp = dict(make_tf_checkpoint.HPARAMS, n_head=6)  # 8-wide heads: only hparams.json can say so
    (folder / "hparams.json").write_text(json.dumps(hp))
    assert gpt.GPT.from_pretrained(str(folder)).config.n_head == 6
    (folder / "hparams.json").unlink()
    with pytest.raises(gpt.GPTError, match="--n_head"):
        gpt.GPT.from_pretrained(str(folder))
    assert gpt.GPT.from_pretrained(str(folder), n_head=3).config.n_head == 3


def test_cli_sample_greedy_equals_hf(hf_from_arrays):
    # "a" is token 64, under the trimmed vocabulary of 300
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gpt.py"), "sample", "--init_from", TF_FOLDER,
                        "--prompt", "a", "--temperature", "0", "--max_new_tokens", "12", "--no_stop_at_eot"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    prompt = torch.tensor([[64]])
    expected = hf_from_arrays.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=12, min_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert r.stdout.rstrip("\n") == gpt.get_tokenizer().decode(expected[0].tolist())


# --- hostile files ---------------------------------------------------------------------------

def _copy(tmp_path):
    folder = tmp_path / "124M"
    shutil.copytree(TF_FOLDER, folder)
    return folder


def _refused(path, *match):
    with pytest.raises(gpt.GPTError) as e:
        gpt.GPT.from_pretrained(str(path))
    msg = str(e.value)
    assert "\n" not in msg and all(m in msg for m in match), msg
    return msg


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_data(tmp_path, keep):
    folder = _copy(tmp_path)
    data = folder / "model.ckpt.data-00000-of-00001"
    raw = data.read_bytes()
    data.write_bytes(raw[: int(len(raw) * keep)])  # later tensors start past the end, or straddle it
    _refused(folder, "truncated", "needs bytes")


def test_missing_data_file(tmp_path):
    folder = _copy(tmp_path)
    (folder / "model.ckpt.data-00000-of-00001").unlink()
    _refused(folder, "cannot read", "data-00000-of-00001")


def test_corrupt_data_fails_crc(tmp_path):
    folder = _copy(tmp_path)
    data = folder / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    _refused(folder, "crc32c")


def test_without_crc32c_one_line_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "crc32c", None)  # import crc32c now raises ImportError
    _refused(TF_FOLDER, "crc32c package", "pip install")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "flipped_byte"])
def test_bad_index(tmp_path, how):
    folder = _copy(tmp_path)
    index = folder / "model.ckpt.index"
    raw = index.read_bytes()
    index.write_bytes({"truncated": raw[: len(raw) - 20], "garbage": os.urandom(len(raw)), "empty": b"",
                       "flipped_byte": raw[:40] + bytes([raw[40] ^ 1]) + raw[41:]}[how])
    _refused(folder, "model.ckpt.index", "TensorFlow checkpoint index")


def test_index_pointing_past_the_end(tmp_path):
    """The index of the 3-layer model over the data file of a 1-layer one: offsets past its end."""
    folder = _copy(tmp_path)
    shutil.copy(os.path.join(FIXTURES, "tf_gpt2_float16", "model.ckpt.data-00000-of-00001"), folder)
    _refused(folder, "truncated", "needs bytes")


def test_float16_refused():
    _refused(os.path.join(FIXTURES, "tf_gpt2_float16"), "float16", "float32")
