"""Nothing lost: SIGKILL at any moment, SIGTERM, corrupt checkpoints, pickled code."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import gpt

GPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt.py")


def train_args(text_file, out_dir, *extra):
    return [sys.executable, GPT, "train", "--data", text_file, "--out_dir", str(out_dir), "--n_layer", "2",
            "--n_head", "2", "--n_embd", "64", "--block_size", "32", "--batch_size", "8", "--dropout", "0.1",
            "--max_iters", "120", "--eval_interval", "10", "--eval_iters", "1", "--device", "cpu", *extra]


def final_weights(out_dir):
    state = gpt.load_checkpoint(gpt.checkpoints_in(out_dir)[0])
    assert state["step"] == 120
    return state["model"]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(text_file, tmp_path):
    subprocess.run(train_args(text_file, tmp_path / "ref"), check=True, capture_output=True, timeout=600)
    reference = final_weights(tmp_path / "ref")
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(7):
        resume = ["--resume"] if gpt.checkpoints_in(out) else []
        proc = subprocess.Popen(train_args(text_file, out, *resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if attempt == 0:  # the first kill lands in the middle of writing a checkpoint
            deadline = time.time() + 120
            while not (out.is_dir() and any(n.endswith(".tmp") for n in os.listdir(out))) and time.time() < deadline:
                time.sleep(0.001)
        else:  # the clock starts when training does: starting takes 2 s here, longer with a CUDA torch
            while (line := proc.stdout.readline()) and not line.startswith("model:"):
                pass
            time.sleep(rng.uniform(0.0, 4.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert all(gpt.load_checkpoint(p)["step"] > 0 for p in gpt.checkpoints_in(out))  # none torn
    last = subprocess.run(train_args(text_file, out, "--resume"), capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr
    assert kills >= 4
    resumed = final_weights(out)
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name


def train_then_signal(text_file, out_dir, signum):
    """Starts a run, sends signum 2 s after its first checkpoint: (exit code, stdout, stderr, saved step)."""
    proc = subprocess.Popen(train_args(text_file, out_dir, "--eval_interval", "1000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not gpt.checkpoints_in(out_dir) and time.time() < deadline:  # training has started
        time.sleep(0.05)
    time.sleep(2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr, gpt.load_checkpoint(gpt.checkpoints_in(out_dir)[0])["step"]


def test_sigterm_saves_and_exits_cleanly(text_file, tmp_path):
    code, stdout, _, step = train_then_signal(text_file, tmp_path, signal.SIGTERM)
    assert code == 0 and "stopped by signal" in stdout
    assert 1 < step < 120


def test_ctrl_c_saves_and_exits_130(text_file, tmp_path):
    code, stdout, stderr, step = train_then_signal(text_file, tmp_path, signal.SIGINT)
    assert code == 130 and f"stopped by signal 2 at step {step};" in stdout and step < 120
    assert stderr.strip().splitlines()[-1] == "gpt: interrupted" and "Traceback" not in stderr


def test_sigkill_after_an_epoch_boundary_and_a_longer_max_iters(text_file, tmp_path):
    """A run of exactly one epoch, resumed from its boundary with a larger --max_iters, killed -9
    in the next epoch and resumed again, ends bit for bit as one uninterrupted run of that length
    (a constant learning rate: a cosine schedule would stretch with --max_iters)."""
    train_tokens, _ = gpt.split_tokens(gpt.load_tokens([text_file]), 32, 0.1)
    per_epoch = len(gpt.TokenWindows(train_tokens, 32, 32, 8))
    total = str(per_epoch + 30)
    subprocess.run(train_args(text_file, tmp_path / "ref", "--schedule", "constant", "--max_iters", total),
                   check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    subprocess.run(train_args(text_file, out, "--schedule", "constant", "--max_iters", str(per_epoch)),
                   check=True, capture_output=True, timeout=600)
    boundary = gpt.load_checkpoint(gpt.checkpoints_in(out)[0])
    assert (boundary["step"], boundary["epoch"], boundary["batch_in_epoch"]) == (per_epoch, 0, per_epoch)
    proc = subprocess.Popen(train_args(text_file, out, "--max_iters", total, "--resume"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and gpt.checkpoints_in(out)[0].endswith(f"{per_epoch:08d}.pt") and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # just past a checkpoint in the second epoch
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
    subprocess.run(train_args(text_file, out, "--max_iters", total, "--resume"), check=True, capture_output=True,
                   timeout=600)
    reference, resumed = (gpt.load_checkpoint(gpt.checkpoints_in(d)[0]) for d in (tmp_path / "ref", out))
    assert resumed["step"] == reference["step"] == int(total) and resumed["epoch"] == 1
    for name, tensor in reference["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # metrics.jsonl: every step once, in order, with the uninterrupted run's losses; evals in order
    steps, evals = {}, {}
    for name in ("ref", "killed"):
        records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        steps[name] = [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]
        evals[name] = [r["step"] for r in records if "train_loss" in r]
    assert [s for s, _, _ in steps["killed"]] == list(range(1, int(total) + 1))
    assert steps["killed"] == steps["ref"]
    assert evals["killed"] == sorted(set(evals["killed"])) and set(evals["ref"]) <= set(evals["killed"])


def test_one_train_per_out_dir_while_sample_reads(text_file, tmp_path):
    first = subprocess.Popen(train_args(text_file, tmp_path, "--max_iters", "100000", "--eval_interval", "5"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (gpt.checkpoints_in(tmp_path) and (tmp_path / "best.pt").exists()) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(train_args(text_file, tmp_path, "--resume"), capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and f"in use by another train (pid {first.pid})" in second.stderr, second.stderr
    sample = subprocess.run([sys.executable, GPT, "sample", "--out_dir", tmp_path, "--max_new_tokens", "3",
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0 and first.poll() is None, sample.stderr  # read while the first still trains
    first.kill()  # SIGKILL: the OS drops the lock with the process
    first.wait()
    step = gpt.load_checkpoint(gpt.checkpoints_in(tmp_path)[0])["step"]
    subprocess.run(train_args(text_file, tmp_path, "--resume", "--max_iters", str(step + 1)), check=True,
                   capture_output=True, timeout=300)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(text_file, tmp_path):
    subprocess.run(train_args(text_file, tmp_path, "--max_iters", "8"), check=True, capture_output=True)
    newest, previous = gpt.checkpoints_in(tmp_path)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 3)
    proc = subprocess.run(train_args(text_file, tmp_path, "--max_iters", "10", "--resume"),
                          capture_output=True, text=True, check=True)
    assert f"skipping {newest}" in proc.stderr and f"resuming from {previous}" in proc.stdout


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(gpt.GPTError, match="not a readable gpt checkpoint"):
            gpt.load_checkpoint(path)
        torch.save({"step": 1, "model": {}, "f": os.system}, tmp_path / "evil2.pt")
        with pytest.raises(gpt.GPTError):
            gpt.load_checkpoint(tmp_path / "evil2.pt")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()


def test_unwritable_out_dir(text_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        proc = subprocess.run(train_args(text_file, locked), capture_output=True, text=True)
        assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        locked.chmod(0o700)


def test_full_disk_on_save_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    good = tmp_path / "ckpt-00000001.pt"
    gpt.save_checkpoint(good, {"step": 1})

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(gpt.GPTError, match="No space left on device"):
        gpt.save_checkpoint(tmp_path / "ckpt-00000002.pt", {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001.pt"] and gpt.load_checkpoint(good)["step"] == 1


def test_files_written_atomically_get_the_mode_open_would_give(tmp_path):
    """Checkpoints, exports and plots are written through a temporary file: they must not keep its
    owner-only mode (0600), or another user of a shared model folder cannot read them."""
    path, plain = tmp_path / "model.gguf", tmp_path / "plain"
    gpt.atomic_write(str(path), lambda f: f.write(b"x"))
    plain.write_bytes(b"x")  # open()'s mode under this process's umask
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~gpt.UMASK
