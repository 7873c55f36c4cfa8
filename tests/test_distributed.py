"""Data-parallel training under torchrun: 2 CPU processes (gloo) on this machine."""
import os
import subprocess
import sys

import numpy as np

import gpt

GPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt.py")


def test_ranks_take_disjoint_batches():
    tokens = np.arange(2000, dtype=np.uint16)
    ranks = [gpt.TokenWindows(tokens, 16, 16, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [{int(s) for x, _ in loader.epoch(1) for s in x[:, 0]} for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 124 // 4 // 2
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == len(ranks[0]) * 2 * 4


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", GPT, "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_two_processes_train_save_once_and_resume(text_file, tmp_path):
    args = ["--data", text_file, "--out_dir", tmp_path / "out", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--block_size", "32", "--batch_size", "4", "--eval_iters", "2", "--lr", "3e-3", "--warmup_iters", "0",
            "--eval_interval", "15", "--device", "cpu"]
    out = torchrun(*map(str, args), "--max_iters", "30")
    assert "2 processes" in out and out.count("| val loss") == 3  # one rank prints
    history = gpt.load_checkpoint(tmp_path / "out" / "ckpt-00000030.pt")["history"]
    assert history["val_loss"][-1] < history["val_loss"][0] - 1.0
    assert history["tokens"][-1] == 30 * 2 * 4 * 32  # both ranks' batches count
    assert sorted(os.listdir(tmp_path / "out")) == ["best.pt", "ckpt-00000016.pt", "ckpt-00000030.pt", "losses.png",
                                                    "metrics.jsonl"]
    out = torchrun(*map(str, args), "--max_iters", "35", "--resume")
    assert "resuming from" in out and "step    35" in out
    assert gpt.load_checkpoint(tmp_path / "out" / "ckpt-00000035.pt")["step"] == 35
