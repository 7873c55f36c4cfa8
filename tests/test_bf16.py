"""bf16 training: --dtype auto (pick_dtype), the fused linear + cross-entropy under bf16 autocast
against the torch path, and a bf16 run that ends where the float32 run ends."""
import pytest
import torch
import torch.nn.functional as F

import gpt
from conftest import requires_cuda
from test_train import tiny_run

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    assert gpt.pick_dtype("float32", "cpu")[0] == "float32"  # a forced dtype is kept, whatever the CPU
    assert gpt.pick_dtype("bfloat16", "cpu") == ("bfloat16", "--dtype")
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert gpt.pick_dtype("auto", "cpu")[0] == ("bfloat16" if native else "float32")
    # the capability check forced off: a CPU without AMX or AVX512-BF16 trains in float32, and says why
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    name, why = gpt.pick_dtype("auto", "cpu")
    assert name == "float32" and "no native bf16" in why
    assert gpt.TrainConfig().dtype == "auto" and gpt.TRAIN_PRESETS["book"]["dtype"] == "float32"


def test_bad_dtype_is_one_line_error(tmp_path):
    with pytest.raises(gpt.GPTError, match="--dtype must be auto or one of"):
        gpt.validate_train_config(gpt.TrainConfig(dtype="half"))


def linear_ce_inputs(N, C, V, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g)
    w = torch.randn(V, C, generator=g) * 0.05
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.2] = -100
    return h.to(device), w.to(device), targets.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,chunk_rows", [(1, 512), (700, 512), (1100, 256)])
def test_linear_cross_entropy_float32_matches_torch(ext, device, N, chunk_rows):
    # several chunks: grad_weight is written by the first chunk and accumulated by the others
    h, w, targets = linear_ce_inputs(N, 48, 3001, seed=N, device=device)
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = gpt.linear_cross_entropy(hx, wx, targets, chunk_rows=chunk_rows)
    (loss * 1.5).backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.cross_entropy(hr @ wr.t(), targets, ignore_index=-100)
    (want * 1.5).backward()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hx.grad, hr.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(wx.grad, wr.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,chunk_rows", [(1, 512), (700, 512), (1100, 256)])
def test_linear_cross_entropy_bfloat16_matches_torch(ext, device, N, chunk_rows):
    """Under bf16 autocast the chunk GEMMs take bf16 h and weight, as autocast's F.linear does, and the
    log-softmax is float32: the loss matches F.cross_entropy over float32 logits of the bf16 GEMM within
    2e-3 (the bf16 rounding of the logits: 2^-9 of |logit| ~ 4 here), the gradients within 2^-7 of their
    largest magnitude (bf16 gradient logits, bf16 GEMM outputs, grad_weight summed per chunk in bf16)."""
    h, w, targets = linear_ce_inputs(N, 48, 3001, seed=N, device=device)
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = gpt.linear_cross_entropy(hx, wx, targets, chunk_rows=chunk_rows)
    loss.backward()
    assert loss.dtype == torch.float32 and hx.grad.dtype == wx.grad.dtype == torch.float32
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = F.cross_entropy((hr.bfloat16().double() @ wr.bfloat16().double().t()), targets, ignore_index=-100)
    want.backward()
    torch.testing.assert_close(loss.double(), want, atol=2e-3, rtol=0)
    for got, ref in ((hx.grad, hr.grad), (wx.grad, wr.grad)):
        torch.testing.assert_close(got.double(), ref.double(), atol=2**-7 * ref.abs().max().item(), rtol=2**-7)


def test_bf16_run_ends_where_the_float32_run_ends(text_file, tmp_path):
    """300 steps of a tiny model, same seed and data, bf16 autocast vs float32: val losses within 0.05."""
    val = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_run(text_file, tmp_path / dtype, max_iters=300, eval_interval=300, eval_iters=4, dtype=dtype,
                       dropout=0.1, backend="ext")
        val[dtype] = gpt.train(cfg)["val_loss"][-1]
    assert val["float32"] < 7.0  # it learned something (ln 50257 = 10.8 at the start)
    assert abs(val["bfloat16"] - val["float32"]) < 0.05, val
