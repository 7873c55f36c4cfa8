import math

import pytest
import torch

import gpt


def tiny_config(**kw):
    return gpt.GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=32), **kw})


def test_initial_loss_is_uniform_over_the_vocabulary(shakespeare_text):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**gpt.MODEL_PRESETS["small"])).eval()
    ids = gpt.text_to_token_ids(shakespeare_text[:20000])[0]
    x = torch.stack([ids[i: i + 256] for i in range(0, 2048, 256)])
    y = torch.stack([ids[i + 1: i + 257] for i in range(0, 2048, 256)])
    with torch.no_grad():
        loss = model(x, y).item()
    assert abs(loss - math.log(50257)) < 0.3, loss


def test_gpt2_init():
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(n_layer=8, n_embd=128, n_head=4))
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    assert abs(model.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 1e-3
    assert model.h[0].attn.c_attn.bias is None and model.h[0].mlp.c_fc.bias.abs().sum() == 0
    assert gpt.GPT(tiny_config(tie_weights=False)).lm_head.weight is not None


def test_logits_and_loss_agree(torch_backend):
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config(qkv_bias=True)).eval()
    x, y = torch.randint(0, 50257, (2, 2, 17))
    logits = model(x)
    assert logits.shape == (2, 17, 50257)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    assert torch.allclose(model(x, y), expected, atol=1e-5)


def test_causality():
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config()).eval()
    x = torch.randint(0, 50257, (1, 20))
    x2 = x.clone()
    x2[0, 12:] = torch.randint(0, 50257, (8,))
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :12], model(x2)[0, :12], atol=1e-5)
        assert not torch.allclose(model(x)[0, 12:], model(x2)[0, 12:], atol=1e-3)


@pytest.mark.parametrize("bad, message", [
    (dict(n_embd=30, n_head=4), "not divisible"),
    (dict(n_layer=0), "n_layer must be a positive"),
    (dict(block_size=-1), "block_size must be a positive"),
    (dict(dropout=1.0), "dropout must be in"),
])
def test_bad_config(bad, message):
    with pytest.raises(gpt.GPTError, match=message):
        gpt.GPT(tiny_config(**bad))


def test_position_past_block_size_is_an_error():
    model = gpt.GPT(tiny_config(block_size=8))
    with pytest.raises(gpt.GPTError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_crop_block_size():
    model = gpt.GPT(tiny_config(block_size=32)).eval()
    x = torch.randint(0, 50257, (1, 8))
    before = model(x)
    model.crop_block_size(8)
    assert model.wpe.weight.shape[0] == 8 and torch.allclose(model(x), before)
    with pytest.raises(gpt.GPTError, match="larger than the model"):
        model.crop_block_size(16)


def test_kv_cache_in_chunks_equals_one_forward():
    torch.manual_seed(0)
    model = gpt.GPT(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # loud weights, so attention matters
        x = torch.randint(0, 50257, (2, 12))
        full = model(x)
        cache = model.new_kv_cache(2)
        parts = [model(x[:, a:b], kv_cache=cache, pos=a) for a, b in ((0, 4), (4, 5), (5, 12))]
    assert (full - full.roll(1, dims=1)).abs().max() > 1.0
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)
    with torch.no_grad():  # last_only: generation's LM head on the last position alone
        last = model(x[:, :7], kv_cache=model.new_kv_cache(2), last_only=True)
        last_of_step = model(x[:, 7:8], kv_cache=cache, pos=7, last_only=True)
    assert last.shape == (2, 1, 50257)
    torch.testing.assert_close(last, full[:, 6:7], rtol=0, atol=1e-4)
    torch.testing.assert_close(last_of_step, full[:, 7:8], rtol=0, atol=1e-4)
