import glob
import math
import os

import pytest
import torch

import gpt


def tiny_run(text_file, out_dir, dropout=0.0, **kw):
    cfg = dict(data=[text_file], out_dir=str(out_dir), model=dict(n_layer=2, n_head=2, n_embd=64, block_size=32,
                                                                  dropout=dropout),
               batch_size=8, lr=3e-3, warmup_iters=2, eval_interval=10, eval_iters=2, device="cpu")
    return gpt.TrainConfig(**{**cfg, **kw})


def test_short_training_lowers_the_loss(text_file, tmp_path):
    history = gpt.train(tiny_run(text_file, tmp_path, max_iters=30))
    assert history["step"] == [1, 11, 21, 30]
    assert history["val_loss"][-1] < history["val_loss"][0] - 2.0
    assert history["train_loss"][-1] < history["train_loss"][0] - 2.0
    assert os.path.exists(tmp_path / "best.pt") and os.path.exists(tmp_path / "losses.png")
    assert len(glob.glob(str(tmp_path / "ckpt-*.pt"))) == 2  # the last two are kept


def test_resume_continues_exactly(text_file, tmp_path):
    """Stopping at step 4 and resuming to step 9 ends with the same weights, bit for bit, as one
    run of 9 steps: weights, AdamW moments, step, data position and dropout RNG all come back."""
    kw = dict(max_iters=9, dropout=0.1, schedule="constant", eval_interval=3)
    gpt.train(tiny_run(text_file, tmp_path / "a", **kw))
    gpt.train(tiny_run(text_file, tmp_path / "b", **{**kw, "max_iters": 4}))
    state = gpt.load_checkpoint(gpt.checkpoints_in(tmp_path / "b")[0])
    assert state["step"] == 4 and len(state["optimizer"]["state"]) > 0
    gpt.train(tiny_run(text_file, tmp_path / "b", **kw, resume=True))
    a = gpt.load_checkpoint(gpt.checkpoints_in(tmp_path / "a")[0])
    b = gpt.load_checkpoint(gpt.checkpoints_in(tmp_path / "b")[0])
    assert a["step"] == b["step"] == 9 and a["tokens_seen"] == b["tokens_seen"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])


def test_early_stopping_keeps_the_best(text_file, tmp_path):
    # a learning rate this high makes val loss rise after the first evals
    history = gpt.train(tiny_run(text_file, tmp_path, max_iters=200, lr=0.5, warmup_iters=0, grad_clip=0.0,
                                 eval_interval=2, patience=2))
    assert history["step"][-1] < 200
    best = gpt.load_checkpoint(tmp_path / "best.pt")
    assert best["best_val"] == min(history["val_loss"])


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(text_file, tmp_path, monkeypatch):
    real = gpt.calc_loss_batch
    calls = {"n": 0}

    def poisoned(x, y, model, device):  # the 5th training batch gives an infinite loss
        calls["n"] += model.training
        loss = real(x, y, model, device)
        return loss * float("inf") if model.training and calls["n"] == 5 else loss

    monkeypatch.setattr(gpt, "calc_loss_batch", poisoned)
    with pytest.raises(gpt.GPTError, match=r"non-finite loss inf .* at step 4"):
        gpt.train(tiny_run(text_file, tmp_path / "stop", max_iters=8, eval_interval=100))
    assert gpt.load_checkpoint(tmp_path / "stop" / "ckpt-00000001.pt")["step"] == 1  # the last good one stays
    calls["n"] = 0
    history = gpt.train(tiny_run(text_file, tmp_path / "skip", max_iters=8, eval_interval=100, skip_nonfinite=True))
    assert history["step"][-1] == 8 and all(math.isfinite(v) for v in history["train_loss"])
