"""Big corpora: streaming tokenization, exact across piece boundaries, flat memory."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gpt

GPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt.py")


def test_pieces_tokenize_exactly_as_the_whole(tmp_path, monkeypatch, shakespeare_text):
    text = shakespeare_text + "\n\n\nend  \n \nx\ny\n\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(gpt, "CHUNK_BYTES", 97)  # hundreds of cuts
    pieces = list(gpt._file_pieces(str(tmp_path / "a.txt")))
    assert len(pieces) > 100 and "".join(pieces) == text
    n = gpt.tokenize_corpus([str(tmp_path / "a.txt")], str(tmp_path / "t.u16"))
    tokens = np.fromfile(tmp_path / "t.u16", dtype=np.uint16)
    assert n == len(tokens) and tokens.tolist() == gpt.get_tokenizer().encode_ordinary(text) + [gpt.EOT_ID]


def test_a_bad_byte_deep_in_a_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt, "CHUNK_BYTES", 64)
    (tmp_path / "a.txt").write_bytes(b"fine text\n" * 50 + b"caf\xe9\n")
    with pytest.raises(gpt.GPTError, match="not UTF-8 text"):
        gpt.tokenize_corpus([str(tmp_path / "a.txt")], str(tmp_path / "t.u16"))
    assert os.listdir(tmp_path) == ["a.txt"]  # no torn output, no temp file left


def peak_memory(stdout):
    """The prepare process's own peak memory and its growth over the start, in MB, as it prints them."""
    return tuple(map(int, re.search(r"peak memory (\d+) MB, (-?\d+) MB over the start", stdout).groups()))


@pytest.mark.slow
def test_prepare_a_gigabyte_in_flat_memory(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = np.array(sorted(set(gpt.shakespeare_documents()[0][1].split())))
    blocks = []
    for _ in range(8):  # 8 different 4 MiB blocks of random verse, written in a random order
        lines = [" ".join(rng.choice(words, 9)) for _ in range(75_000)]
        blocks.append(("\n".join(lines) + "\n").encode()[: 4 << 20].rsplit(b"\n", 1)[0] + b"\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    size = 0
    orders = [rng.integers(0, 8, 64) for _ in range(4)]
    for i, order in enumerate(orders):  # four files, tokenized in parallel pieces
        with open(corpus / f"part{i}.txt", "wb") as f:
            for j in order:
                f.write(blocks[j])
                size += len(blocks[j])
    assert size >= 1_000_000_000
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, GPT, "prepare", "--data", str(corpus), "--out_dir", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    peak_mb, grew_mb = peak_memory(proc.stdout)
    meta = json.loads((out / "meta.json").read_text())
    tokens = gpt.load_tokens([str(out)])
    assert len(tokens) == meta["tokens"] > 200_000_000
    # spot check: the first block tokenizes as the whole block would
    first = blocks[orders[0][0]].decode()
    head = gpt.get_tokenizer().encode_ordinary(first)
    assert tokens[: len(head) - 1].tolist() == head[:-1]
    with capsys.disabled():  # the figure belongs in the CI log
        print(f"\nprepare: {size / 1e9:.2f} GB of text -> {len(tokens):,} tokens, peak RSS {peak_mb} MB "
              f"({grew_mb} MB over the start)")
    # the text is 1,070 MB and its tokens 608 MB: holding either whole would break this bound. Counted
    # from the start, as importing torch takes 0.3 GB on CPU and 0.6 GB with CUDA
    assert grew_mb < 300, f"peak memory {peak_mb} MB, {grew_mb} MB over the start: it grows with the corpus"


@pytest.mark.slow
def test_token_files_of_a_gigabyte_in_flat_memory(tmp_path, capsys):
    rng = np.random.default_rng(1)
    with open(tmp_path / "train.bin", "wb") as f:  # nanoGPT's layout: flat uint16
        for _ in range(16):
            rng.integers(0, 50257, 1 << 25, dtype=np.uint16).tofile(f)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = 20240520, 1, 1 << 20
    val = rng.integers(0, 50257, 1 << 20, dtype=np.uint16)
    (tmp_path / "x_val.bin").write_bytes(header.tobytes() + val.tobytes())  # llm.c's layout
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, GPT, "prepare", "--data", str(tmp_path / "train.bin"),
                           str(tmp_path / "x_val.bin"), "--out_dir", str(out)], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr
    peak_mb, grew_mb = peak_memory(proc.stdout)
    tokens = gpt.load_tokens([str(out)])
    assert len(tokens) == (1 << 29) + (1 << 20) and tokens.val_start == 1 << 29
    assert np.array_equal(np.asarray(tokens[1 << 29:]), val)
    assert np.array_equal(tokens.parts[0][:1000], np.fromfile(tmp_path / "train.bin", dtype=np.uint16, count=1000))
    with capsys.disabled():
        print(f"\nprepare: 1 GiB of token files -> {len(tokens):,} tokens, peak RSS {peak_mb} MB "
              f"({grew_mb} MB over the start)")
    # tokenize_corpus keeps up to 2 batches of ~1 MiB a core in flight, each held as input, output and bytes
    bound = 64 + 6 * min(gpt.usable_cpus(), 32)  # 76 MB on 2 cores, 160 on 16: far below the 1 GiB
    assert grew_mb < bound, f"peak memory {peak_mb} MB, {grew_mb} MB over the start: it grows with the token files"
