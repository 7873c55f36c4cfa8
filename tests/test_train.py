import glob
import json
import math
import os
import signal
import sys
import time

import numpy as np
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
    with pytest.raises(gpt.GPTError, match=r"non-finite loss inf .* in step 5"):
        gpt.train(tiny_run(text_file, tmp_path / "stop", max_iters=8, eval_interval=100))
    assert gpt.load_checkpoint(tmp_path / "stop" / "ckpt-00000001.pt")["step"] == 1  # the last good one stays
    calls["n"] = 0
    history = gpt.train(tiny_run(text_file, tmp_path / "skip", max_iters=8, eval_interval=100, skip_nonfinite=True))
    assert history["step"][-1] == 8 and all(math.isfinite(v) for v in history["train_loss"])


def test_skip_nonfinite_still_stops_on_sigterm(text_file, tmp_path, monkeypatch):
    """Every batch NaN under --skip_nonfinite: no step is ever taken, yet SIGTERM still ends the run."""
    calls = {"n": 0}

    def nan_loss(x, y, model, device):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        assert calls["n"] < 50, "SIGTERM was swallowed: the loop never checked for it"
        return model(x.to(device), y.to(device)) * float("nan")

    monkeypatch.setattr(gpt, "calc_loss_batch", nan_loss)
    history = gpt.train(tiny_run(text_file, tmp_path, max_iters=8, skip_nonfinite=True))
    assert calls["n"] == 3 and history["step"] == []
    assert gpt.load_checkpoint(gpt.checkpoints_in(tmp_path)[0])["step"] == 0  # saved where it stood


def short_epoch_file(tmp_path, shakespeare_text):
    """A corpus whose training split holds exactly 3 batches of 4 windows of 16 tokens."""
    path = tmp_path / "short.txt"
    path.write_text(shakespeare_text[:800], encoding="utf-8")
    train_tokens, _ = gpt.split_tokens(gpt.load_tokens([str(path)]), 16, 0.1)
    assert len(gpt.TokenWindows(train_tokens, 16, 16, 4)) == 3
    return str(path)


def short_run(path, out_dir, **kw):
    short = dict(model=dict(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.1), batch_size=4,
                 schedule="constant", eval_interval=100)
    return tiny_run(path, out_dir, **{**short, **kw})


def assert_same_run(a, b):
    a, b = (gpt.load_checkpoint(gpt.checkpoints_in(d)[0]) for d in (a, b))
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (b["step"], b["epoch"], b["batch_in_epoch"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])


@pytest.mark.parametrize("stop", [1, 2, 3, 4], ids=["first batch", "last batch", "on the boundary", "next epoch"])
def test_resume_at_every_position_of_a_short_epoch(tmp_path, shakespeare_text, stop):
    """A run stopped after `stop` steps (3 per epoch) and resumed with a larger --max_iters ends
    bit for bit where one uninterrupted run does (stopping on the boundary raised StopIteration)."""
    path = short_epoch_file(tmp_path, shakespeare_text)
    gpt.train(short_run(path, tmp_path / "whole", max_iters=7))
    gpt.train(short_run(path, tmp_path / "parts", max_iters=stop))
    gpt.train(gpt.TrainConfig(out_dir=str(tmp_path / "parts"), resume=True, max_iters=7, device="cpu"))
    assert_same_run(tmp_path / "whole", tmp_path / "parts")


def test_resume_on_an_epoch_boundary_with_more_epochs(tmp_path, shakespeare_text):
    path = short_epoch_file(tmp_path, shakespeare_text)
    gpt.train(short_run(path, tmp_path / "whole", max_iters=None, epochs=2))
    gpt.train(short_run(path, tmp_path / "parts", max_iters=None, epochs=1))
    gpt.train(gpt.TrainConfig(out_dir=str(tmp_path / "parts"), resume=True, max_iters=None, epochs=2, device="cpu"))
    assert_same_run(tmp_path / "whole", tmp_path / "parts")
    assert gpt.load_checkpoint(gpt.checkpoints_in(tmp_path / "parts")[0])["step"] == 6


def test_resume_restores_the_run_and_says_what_changed(tmp_path, shakespeare_text, capsys):
    """--resume takes corpus, batch size, val fraction and model from the checkpoint; a changed
    max_iters or lr is taken and said in one line; a changed model or data setting is refused."""
    path = short_epoch_file(tmp_path, shakespeare_text)
    out = tmp_path / "run"
    gpt.train(short_run(path, out, max_iters=2, val_fraction=0.2))
    capsys.readouterr()
    gpt.train(gpt.TrainConfig(out_dir=str(out), resume=True, max_iters=3, lr=5e-3, device="cpu"))
    printed = capsys.readouterr().out
    assert "--resume with changes: lr 0.003 -> 0.005, max_iters 2 -> 3" in printed and "schedule" in printed
    state = gpt.load_checkpoint(gpt.checkpoints_in(out)[0])
    run = state["train_config"]
    assert run["data"] == [os.path.abspath(path)] and run["batch_size"] == 4 and run["val_fraction"] == 0.2
    assert run["lr"] == 5e-3 and state["config"]["n_layer"] == 1 and state["tokens_seen"] == 3 * 4 * 16
    for change, what in [(dict(model=dict(n_layer=4)), "--n_layer 4"), (dict(batch_size=8), "--batch_size 8"),
                         (dict(data=[str(tmp_path / "other.txt")]), "--data"),
                         (dict(val_fraction=0.3), "--val_fraction")]:
        with pytest.raises(gpt.GPTError, match=what + ".* differs from the run being resumed"):
            gpt.train(gpt.TrainConfig(out_dir=str(out), resume=True, device="cpu", **change))


def test_a_run_folder_holds_one_run(tmp_path, shakespeare_text):
    path = short_epoch_file(tmp_path, shakespeare_text)
    gpt.train(short_run(path, tmp_path, max_iters=4, eval_interval=2))
    first = gpt.load_checkpoint(tmp_path / "best.pt")["run_id"]
    with pytest.raises(gpt.GPTError, match="holds another run .*--resume.*--overwrite"):
        gpt.train(short_run(path, tmp_path, max_iters=1))
    gpt.train(short_run(path, tmp_path, max_iters=1, overwrite=True))  # the old run's files go first
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "ckpt-00000001.pt", "losses.png", "metrics.jsonl", "short.txt"]
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 1]  # a step, an eval
    assert gpt.load_checkpoint(tmp_path / "best.pt")["run_id"] not in ("", first)


def test_rotation_keeps_this_runs_newest_and_never_touches_another_run(tmp_path):
    gpt.save_checkpoint(tmp_path / "ckpt-00000090.pt", {"run_id": "other", "step": 90})
    for step in (4, 5, 6, 3):  # resumed from step 2 after 4-6 were written: 3 is the newest
        gpt.save_run_checkpoint(tmp_path, {"run_id": "mine", "step": step})
        time.sleep(0.01)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000003.pt", "ckpt-00000006.pt", "ckpt-00000090.pt"]


def test_no_val_split_means_no_val_numbers(text_file, tmp_path, capsys):
    history = gpt.train(tiny_run(text_file, tmp_path, max_iters=12, val_fraction=0.0, eval_interval=5))
    printed = capsys.readouterr().out
    assert "val loss" not in printed and "no validation split (--val_fraction 0)" in printed
    assert "best train loss" in printed
    assert all(math.isnan(v) for v in history["val_loss"])
    assert gpt.load_checkpoint(tmp_path / "best.pt")["best_val"] == min(history["train_loss"])


def test_eval_samples_print_control_characters_escaped():
    assert gpt.printable("a\x1b[31mb\r\nc\td\x00") == "a\\x1b[31mb\\r | c\\td\\x00"


def drawn_lines(fig):
    """{label: [(x, y), ...]} of the lines plot_losses drew, loss panel and learning-rate panel."""
    loss_ax, = [ax for ax in fig.axes if ax.get_ylabel() == "Loss"]
    lr_ax, = [ax for ax in fig.axes if ax.get_ylabel() == "Learning rate"]
    lines = {line.get_label(): line.get_xydata().tolist() for line in loss_ax.get_lines()}
    return {**lines, "lr": lr_ax.get_lines()[0].get_xydata().tolist()}


def record_plots(monkeypatch):
    """Wraps plot_losses: each call's figure, the metrics.jsonl records it read, and the PNG it left."""
    calls, real = [], gpt.plot_losses

    def plot(metrics_path, path):
        fig = real(metrics_path, path)
        records = [json.loads(line) for line in open(metrics_path)]
        calls.append((drawn_lines(fig), records, open(path, "rb").read()))
        return fig

    monkeypatch.setattr(gpt, "plot_losses", plot)
    return calls


def test_losses_png_is_redrawn_at_each_eval_from_metrics_jsonl(text_file, tmp_path, monkeypatch):
    calls = record_plots(monkeypatch)
    gpt.train(tiny_run(text_file, tmp_path, max_iters=12, eval_interval=5))
    assert len(calls) == 4  # the evals after steps 1, 6, 11, 12
    pngs = [png for _, _, png in calls]
    assert all(png.startswith(b"\x89PNG") for png in pngs) and len(set(pngs)) == 4  # a new picture each time
    assert pngs[-1] == (tmp_path / "losses.png").read_bytes()
    for lines, records, _ in calls:  # what is drawn is what metrics.jsonl held at that moment
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "train_loss" in r]
        assert lines["Training loss, each step"] == [[r["step"], r["loss"]] for r in steps]
        assert lines["lr"] == [[r["step"], r["lr"]] for r in steps]
        assert lines["Training loss, eval"] == [[r["step"], r["train_loss"]] for r in evals]
        assert lines["Validation loss"] == [[r["step"], r["val_loss"]] for r in evals]
    assert [x for x, _ in lines["Training loss, eval"]] == [1, 6, 11, 12]
    # the smoothed curve: at each step the mean of the raw losses in a window centered on it (none of the
    # lag of an EMA), narrowing to the step itself at the two ends
    raw, smooth = (np.array(lines[k]) for k in ("Training loss, each step", "Training loss, moving average"))
    assert smooth[:, 0].tolist() == raw[:, 0].tolist()
    y, n = raw[:, 1], len(raw)
    for i, s in enumerate(smooth[:, 1]):
        assert any(np.isclose(s, y[i - h:i + h + 1].mean()) for h in range(min(i, n - 1 - i) + 1)), i
    assert smooth[1:-1, 1].tolist() != y[1:-1].tolist()  # it does smooth


def test_losses_png_of_one_step_without_val_then_resumed(text_file, tmp_path, monkeypatch):
    calls = record_plots(monkeypatch)
    gpt.train(tiny_run(text_file, tmp_path, max_iters=1, val_fraction=0.0))
    lines = calls[-1][0]
    assert "Validation loss" not in lines  # --val_fraction 0: no val points
    assert [x for x, _ in lines["Training loss, each step"]] == [1] == [x for x, _ in lines["Training loss, eval"]]
    gpt.train(tiny_run(text_file, tmp_path, max_iters=7, val_fraction=0.0, eval_interval=3, resume=True))
    lines = calls[-1][0]  # the resumed run's curve continues the first run's
    assert [x for x, _ in lines["Training loss, each step"]] == [1, 2, 3, 4, 5, 6, 7]
    assert [x for x, _ in lines["Training loss, eval"]] == [1, 4, 7]
    assert "Validation loss" not in lines


def test_the_training_loop_reads_the_device_once_a_step(text_file, tmp_path, monkeypatch):
    """Host reads of a tensor (item, tolist, float(), int(), bool()) made by gpt.py outside the evals:
    none per micro-step, exactly one per step (the last step's loss and gradient norm, read one step late),
    so a GPU is never left waiting for the host mid-step."""
    reads, in_eval = [], []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name):
            caller = sys._getframe(1)
            if caller.f_code.co_filename == gpt.__file__ and not in_eval:
                reads.append(f"{caller.f_code.co_name}:{_name}")
            return _real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_evaluate = gpt.evaluate

    def evaluate(*args, **kw):
        in_eval.append(1)
        try:
            return real_evaluate(*args, **kw)
        finally:
            in_eval.pop()

    monkeypatch.setattr(gpt, "evaluate", evaluate)
    # the kernels read small scalars where that is free (the CPU); count as on a GPU, where it is not
    monkeypatch.setattr(gpt, "_host_reads_free", lambda t: False)

    def count(steps, grad_accum, name):
        reads.clear()
        gpt.train(tiny_run(text_file, tmp_path / name, max_iters=steps, grad_accum=grad_accum, batch_size=2,
                           eval_interval=100))
        return list(reads)

    count(2, 1, "warm")  # one-time work (the kernels' first-use check) out of the way
    one, four, longer = count(6, 1, "one"), count(6, 4, "four"), count(12, 1, "longer")
    assert one == four, "a host read per micro-step"
    assert len(longer) - len(one) == 6 and set(longer) - set(one) == set(), longer
    assert one.count("read:tolist") == 6


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc policy")
def test_keep_freed_memory_keeps_a_freed_tensor_in_the_process():
    """gpt.train calls keep_freed_memory: a freed 200 MB tensor stays in the process for the next
    step (no page faults to get it back), where by default glibc hands it back to the OS."""
    import subprocess

    code = ("import sys, torch, gpt\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "if sys.argv[1] == 'keep': assert gpt.keep_freed_memory()\n"
            "t = torch.ones(50_000_000); before = rss(); del t\n"
            "print(before - rss())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    returned = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=root,
                                         check=True).stdout) for mode in ("keep", "default")}
    assert returned["default"] > 150e6  # the 200 MB went back to the OS
    assert abs(returned["keep"]) < 20e6  # kept
