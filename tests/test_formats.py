"""--data formats: text (.txt, BOM and CRLF normalised), JSON lines and parquet with a `text` field,
nanoGPT's and llm.c's token files; each gives the tokens its equivalent text gives, and each bad
file is one clear line."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gpt

GPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpt.py")
DOCS = ["First document.\nIt has two lines.\n", "Zweites Dokument: café, 東京, emoji 🙂\n",
        "  leading spaces and a <|endoftext|> written out\n\n\nend", "x"]


def encode(text):
    return gpt.get_tokenizer().encode_ordinary(text)


def nanogpt_tokens(docs):  # nanoGPT's prepare.py: each document's tokens, then <|endoftext|>
    return np.array([t for d in docs for t in encode(d) + [gpt.EOT_ID]], dtype=np.uint16)


def llmc_tokens(docs):  # llm.c's dev/data scripts: <|endoftext|>, then each document's tokens
    return np.array([t for d in docs for t in [gpt.EOT_ID] + encode(d)], dtype=np.uint16)


def write_llmc(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def txt_folder(tmp_path, docs, name="txt"):
    folder = tmp_path / name
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"{i:03d}.txt").write_bytes(doc.encode("utf-8"))
    return folder


# --- text ---------------------------------------------------------------------------

def test_bom_and_crlf_are_normalised_across_read_boundaries(tmp_path, monkeypatch):
    text = "Hello BOM world.\nA second line.\n\nlone\rcarriage return\n" * 40
    crlf = "\ufeff" + text.replace("\n", "\r\n")
    (tmp_path / "crlf.txt").write_bytes(crlf.encode("utf-8"))
    expected = encode(text.replace("\r", "\n")) + [gpt.EOT_ID]
    for chunk in (1, 2, 3, 7, 1 << 20):  # reads that split the BOM, a \r\n and multi-byte characters
        monkeypatch.setattr(gpt, "CHUNK_BYTES", chunk)
        pieces = list(gpt._file_pieces(str(tmp_path / "crlf.txt")))
        assert "".join(pieces) == text.replace("\r", "\n")
    assert gpt.load_tokens([str(tmp_path / "crlf.txt")]).tolist() == expected


def test_suffixes_match_in_any_case_and_hidden_files_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "C.TXT").write_text("gamma", encoding="utf-8")
    (tmp_path / "b.Jsonl").write_text('{"text": "beta"}\n', encoding="utf-8")
    (tmp_path / "notes.md").write_text("not data", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    files = [os.path.basename(p) for p in gpt._data_files([str(tmp_path)])]
    assert files == ["C.TXT", "a.txt", "b.Jsonl"]  # sorted by name, as the folder walk promises
    tokens = gpt.load_tokens([str(tmp_path)]).tolist()
    assert tokens == [t for w in ("gamma", "alpha", "beta") for t in encode(w) + [gpt.EOT_ID]]


def test_cache_key_changes_with_the_normalisation_version_and_the_kind(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text('{"text": "same bytes"}\n', encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "same bytes"}\n', encoding="utf-8")
    txt, jsonl = gpt._content_key([str(tmp_path / "a.txt")]), gpt._content_key([str(tmp_path / "a.jsonl")])
    assert txt != jsonl
    monkeypatch.setattr(gpt, "TOKENS_VERSION", gpt.TOKENS_VERSION + 1)
    assert gpt._content_key([str(tmp_path / "a.txt")]) != txt


def test_describe_data_names_the_files_read(tmp_path):
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text("text", encoding="utf-8")
    line = gpt.describe_data([str(tmp_path)])
    assert line.startswith("data: 4 files: ") and "a.txt" in line and "c.txt" in line
    assert "d.txt" not in line and "(1 more)" in line and "\n" not in line
    one = gpt.describe_data([str(tmp_path / "a.txt")])
    assert one == f"data: 1 file: {tmp_path / 'a.txt'}"
    assert "Shakespeare" in gpt.describe_data(None)
    nano = tmp_path / "nano"
    nano.mkdir()
    nanogpt_tokens(DOCS).tofile(nano / "train.bin")
    nanogpt_tokens(DOCS[:1]).tofile(nano / "val.bin")
    assert gpt.describe_data([str(nano)]).endswith(f"validation split: {nano / 'val.bin'} (not --val_fraction)")


# --- JSON lines and parquet ---------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".JSONL"])
def test_json_lines_give_the_tokens_of_one_txt_per_document(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(gpt, "CHUNK_BYTES", 16)  # long documents cut into pieces, many per batch
    docs = DOCS + ["a long document\n" * 50]
    path = tmp_path / f"docs{suffix}"
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs)]
    lines.insert(2, json.dumps({"text": ""}))  # an empty text is no document
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
    expected = gpt.load_tokens([str(txt_folder(tmp_path, docs))]).tolist()
    assert gpt.load_tokens([str(path)]).tolist() == expected == nanogpt_tokens(docs).tolist()


def test_json_lines_text_is_normalised_like_txt(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "\ufeffone\r\ntwo\rthree"}) + "\n", encoding="utf-8")
    (tmp_path / "a.txt").write_bytes("\ufeffone\r\ntwo\rthree".encode("utf-8"))
    assert gpt.load_tokens([str(tmp_path / "a.jsonl")]).tolist() == gpt.load_tokens([str(tmp_path / "a.txt")]).tolist()


def test_parquet_gives_the_tokens_of_one_txt_per_document(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = DOCS * 700  # several row batches
    table = pa.table({"id": list(range(len(docs) + 1)), "text": docs[:5] + [None] + docs[5:]})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=1000)
    expected = nanogpt_tokens(docs).tolist()
    assert gpt.load_tokens([str(tmp_path / "docs.parquet")]).tolist() == expected
    assert gpt.load_tokens([str(txt_folder(tmp_path, DOCS))]).tolist() == nanogpt_tokens(DOCS).tolist()


# --- token files --------------------------------------------------------------------------

def test_nanogpt_bin_is_mapped_in_place_with_the_tokens_of_the_txt(tmp_path):
    nanogpt_tokens(DOCS).tofile(tmp_path / "train.bin")
    tokens = gpt.load_tokens([str(tmp_path / "train.bin")])
    assert isinstance(tokens, np.memmap) and os.path.samefile(tokens.filename, tmp_path / "train.bin")
    assert tokens.tolist() == gpt.load_tokens([str(txt_folder(tmp_path, DOCS))]).tolist()


def test_llmc_shard_is_mapped_past_its_header(tmp_path):
    expected = llmc_tokens(DOCS)
    write_llmc(tmp_path / "shakespeare_train.bin", expected)
    tokens = gpt.load_tokens([str(tmp_path / "shakespeare_train.bin")])
    assert isinstance(tokens, np.memmap) and tokens.offset == 1024
    assert tokens.tolist() == expected.tolist()
    # the same documents as text: the same tokens, <|endoftext|> before each document instead of after
    text = gpt.load_tokens([str(txt_folder(tmp_path, DOCS))]).tolist()
    assert tokens.tolist() == [gpt.EOT_ID] + text[:-1]


def test_nanogpt_train_and_val_bin_are_the_two_splits(tmp_path):
    train, val = nanogpt_tokens(DOCS * 3), nanogpt_tokens(DOCS[:2])
    train.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    tokens = gpt.load_tokens([str(tmp_path)])
    assert len(tokens) == len(train) + len(val) and tokens.val_start == len(train)
    got_train, got_val = gpt.split_tokens(tokens, block_size=4, val_fraction=0.5)  # the files' split wins
    assert np.asarray(got_train).tolist() == train.tolist() and np.asarray(got_val).tolist() == val.tolist()
    with pytest.raises(gpt.GPTError, match=r"validation files hold \d+ tokens, too few for block_size 64"):
        gpt.split_tokens(tokens, block_size=64, val_fraction=0.1)
    # val.bin alone is simply a corpus
    assert gpt.load_tokens([str(tmp_path / "val.bin")]).tolist() == val.tolist()


def test_llmc_shards_are_read_as_one_without_copying(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    shards = {f"fineweb_train_{i:06d}.bin": rng.integers(0, 50257, n, dtype=np.uint16) for i, n in ((1, 300), (2, 1))}
    shards["fineweb_train_000003.bin"] = rng.integers(0, 50257, 250, dtype=np.uint16)
    shards["fineweb_val_000000.bin"] = rng.integers(0, 50257, 120, dtype=np.uint16)
    for name, t in shards.items():
        write_llmc(tmp_path / name, t)
    monkeypatch.setattr(gpt, "cache_dir", lambda: pytest.fail("token files must not be copied to the cache"))
    tokens = gpt.load_tokens([str(tmp_path)])
    train = np.concatenate([shards[f"fineweb_train_{i:06d}.bin"] for i in (1, 2, 3)])
    val = shards["fineweb_val_000000.bin"]
    assert isinstance(tokens, gpt.TokenParts) and tokens.val_start == len(train) == 551
    assert np.asarray(tokens).tolist() == train.tolist() + val.tolist()
    whole = np.concatenate([train, val])
    for start, stop in ((0, 551), (295, 305), (299, 302), (300, 301), (540, 560), (0, 671), (670, 900), (5, 5)):
        assert np.asarray(tokens[start:stop]).tolist() == whole[start:stop].tolist(), (start, stop)
    assert [tokens[i] for i in (0, 300, 301, 550, 551, -1)] == [whole[i] for i in (0, 300, 301, 550, 551, -1)]
    # windows across shard boundaries are the windows of the joined array
    got_train, got_val = gpt.split_tokens(tokens, 16, 0.1)
    a = gpt.TokenWindows(got_train, 16, 7, 4, seed=3)
    b = gpt.TokenWindows(train, 16, 7, 4, seed=3)
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(a.epoch(0), b.epoch(0)))
    assert len(a) == len(b) > 0


def test_text_and_token_files_mix_text_first(tmp_path):
    nanogpt_tokens(DOCS[2:]).tofile(tmp_path / "a.bin")
    (tmp_path / "b.txt").write_text(DOCS[0], encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n", encoding="utf-8")
    tokens = gpt.load_tokens([str(tmp_path)])
    assert np.asarray(tokens).tolist() == nanogpt_tokens(DOCS).tolist()


def test_prepare_takes_every_format_and_keeps_the_validation_split(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (src / "b.jsonl").write_text(json.dumps({"text": DOCS[1]}) + "\n", encoding="utf-8")
    nanogpt_tokens(DOCS[2:]).tofile(src / "train.bin")
    write_llmc(src / "x_val.bin", llmc_tokens(DOCS[:1]))
    gpt.prepare([str(src)], str(tmp_path / "prepared"))
    out = capsys.readouterr().out
    assert out.startswith("data: 3 files: ") and "validation split" in out
    prepared = gpt.load_tokens([str(tmp_path / "prepared")])
    direct = gpt.load_tokens([str(src)])
    assert prepared.val_start == direct.val_start == len(nanogpt_tokens(DOCS))
    assert np.asarray(prepared).tolist() == np.asarray(direct).tolist()
    assert np.asarray(prepared).tolist() == nanogpt_tokens(DOCS).tolist() + llmc_tokens(DOCS[:1]).tolist()


def test_a_nanogpt_folder_trains_with_val_bin_as_validation(tmp_path, shakespeare_text):
    ids = np.array(encode(shakespeare_text[:12_000]), dtype=np.uint16)
    ids[:-400].tofile(tmp_path / "train.bin")
    ids[-400:].tofile(tmp_path / "val.bin")
    proc = subprocess.run([sys.executable, GPT, "train", "--data", str(tmp_path), "--out_dir", str(tmp_path / "out"),
                           "--max_iters", "2", "--eval_interval", "2", "--n_layer", "1", "--n_head", "2",
                           "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--eval_iters", "2",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "val loss" in proc.stdout
    state = gpt.load_checkpoint(str(tmp_path / "out" / "best.pt"))
    # eval without --data scores the checkpoint's validation split: val.bin's 12 windows of 32
    proc = subprocess.run([sys.executable, GPT, "eval", "--out_dir", str(tmp_path / "out"), "--batch_size", "4",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "3 batches of 4x32" in proc.stdout and state["step"] == 2
    # the run folder inside the data folder (its metrics.jsonl, checkpoints) is not read as data
    assert gpt._data_files([str(tmp_path)]) == [str(tmp_path / "train.bin"), str(tmp_path / "val.bin")]


# --- bad files: one line each ---------------------------------------------------------------

def _bad_files(tmp):
    """name -> how to make it; every one must be refused in one line."""
    good = nanogpt_tokens(DOCS)
    return {
        "wrong_magic.bin": lambda p: write_llmc(p, good, magic=20240521),
        "llama3_shard.bin": lambda p: write_llmc(p, good, magic=20240801, version=7),
        "version2.bin": lambda p: write_llmc(p, good, version=2),
        "truncated.bin": lambda p: (write_llmc(p, good), os.truncate(p, os.path.getsize(p) - 4)),
        "big_ids.bin": lambda p: np.concatenate([good, [50257], good]).astype(np.uint16).tofile(p),
        "big_ids_llmc.bin": lambda p: write_llmc(p, np.concatenate([good, [65535]])),
        "odd.bin": lambda p: p.write_bytes(b"\x01\x02\x03"),
        "empty.bin": lambda p: p.write_bytes(b""),
        "empty_shard.bin": lambda p: write_llmc(p, []),
        "no_text.jsonl": lambda p: p.write_text('{"text": "fine"}\n{"content": "no text field"}\n'),
        "text_not_str.jsonl": lambda p: p.write_text('{"text": 3}\n'),
        "not_json.jsonl": lambda p: p.write_text('{"text": "fine"}\n{"text": unquoted}\n'),
        "array.json": lambda p: p.write_text('[{"text": "a"},\n {"text": "b"}]\n'),
        "empty.jsonl": lambda p: p.write_text("\n\n"),
        "only_empty_texts.jsonl": lambda p: p.write_text('{"text": ""}\n'),
        "latin1.jsonl": lambda p: p.write_bytes('{"text": "café"}\n'.encode("latin-1")),
        "garbage.parquet": lambda p: p.write_bytes(b"not parquet at all"),
        "bom_only.txt": lambda p: p.write_bytes(b"\xef\xbb\xbf\r\n"),
    }


BAD = [  # (file or folder, what the one-line error must say)
    ("wrong_magic.bin", "magic 20240521, not 20240520"),
    ("llama3_shard.bin", "magic 20240801"),
    ("version2.bin", "version 2"),
    ("truncated.bin", "truncated"),
    ("big_ids.bin", "token id 50257 at position"),
    ("big_ids_llmc.bin", "token id 65535"),
    ("odd.bin", "odd size"),
    ("empty.bin", "is empty"),
    ("empty_shard.bin", "is empty"),
    ("no_text.jsonl", 'line 2 of .* has no "text"'),
    ("text_not_str.jsonl", 'line 1 of .* has no "text" string'),
    ("not_json.jsonl", "line 2 of .* is not JSON"),
    ("array.json", "is a JSON array"),
    ("empty.jsonl", "is empty"),
    ("only_empty_texts.jsonl", "is empty"),
    ("latin1.jsonl", "not UTF-8"),
    ("garbage.parquet", "not a readable parquet file"),
    ("bom_only.txt", "is empty"),
    ("no_text_column.parquet", "no `text` column"),
    ("char_level/train.bin", "meta.pkl"),
    ("prepared + text", "a prepared corpus must be used alone"),
    ("folder of nothing", "no .txt files"),
]


@pytest.mark.parametrize("name, message", BAD, ids=[n for n, _ in BAD])
def test_bad_data_is_one_clear_line(name, message, tmp_path, capsys):
    makers = _bad_files(tmp_path)
    data = [str(tmp_path / name)]
    if name in makers:
        makers[name](tmp_path / name)
    elif name == "no_text_column.parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / name)
    elif name == "char_level/train.bin":
        (tmp_path / "char_level").mkdir()
        np.arange(60, dtype=np.uint16).tofile(tmp_path / name)
        (tmp_path / "char_level" / "meta.pkl").write_bytes(b"\x80\x04}\x94.")
    elif name == "prepared + text":
        (tmp_path / "a.txt").write_text("some text\n")
        gpt.prepare([str(tmp_path / "a.txt")], str(tmp_path / "prepared"))
        data = [str(tmp_path / "prepared"), str(tmp_path / "a.txt")]
    elif name == "folder of nothing":
        (tmp_path / "nothing").mkdir()
        (tmp_path / "nothing" / "readme.md").write_text("no data here")
        data = [str(tmp_path / "nothing")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        gpt.main(["prepare", "--data", *data, "--out_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "out" / "tokens.u16")  # nothing half-written


def test_parquet_without_pyarrow_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(gpt.GPTError, match=r"needs pyarrow: `pip install pyarrow`"):
        gpt.load_tokens([str(tmp_path / "a.parquet")])


def test_train_on_a_prepared_corpus_and_text_says_use_it_alone(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n")
    gpt.prepare([str(tmp_path / "a.txt")], str(tmp_path / "prepared"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        gpt.main(["train", "--data", str(tmp_path / "prepared"), str(tmp_path / "a.txt"), "--out_dir",
                  str(tmp_path / "out"), "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "is a prepared corpus (`gpt.py prepare`): a prepared corpus must be used alone as --data" in lines[0]
