import numpy as np
import pytest
import torch

import gpt


def test_shakespeare_is_plain_dialogue():
    docs = gpt.shakespeare_documents()
    assert len(docs) >= 30
    text = docs[0][1]
    assert "THESEUS:\nNow, fair Hippolyta, our nuptial hour" in text
    for markup in ("**", "#", "_Enter", "\\[", "  \n"):
        assert markup not in text


def test_markdown_conversion():
    md = ("# Play\n\n## ACT I\n\n_Enter A and\nB_\n\n**A**  \nGood morrow, __\\[Aside]_ friend.  \n"
          "Well met.\n\n*Exit B.*\n\nAnd so farewell.\n")
    assert gpt.markdown_play_to_text(md) == "A:\nGood morrow, friend.\nWell met.\n\nAnd so farewell.\n"


def test_token_cache_is_reused(text_file):
    first = gpt.load_tokens([text_file])
    second = gpt.load_tokens([text_file])
    assert first.filename == second.filename and isinstance(second, np.memmap)
    assert second.dtype == np.uint16
    expected = gpt.get_tokenizer().encode_ordinary(open(text_file, encoding="utf-8").read()) + [gpt.EOT_ID]
    assert second.tolist() == expected


def test_documents_are_joined_with_endoftext(tmp_path):
    (tmp_path / "a.txt").write_text("one two", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("three", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    tokens = gpt.load_tokens([str(tmp_path)]).tolist()
    enc = gpt.get_tokenizer()
    assert tokens == enc.encode_ordinary("one two") + [50256] + enc.encode_ordinary("three") + [50256]


def test_windows_stride_and_targets():
    tokens = np.arange(100, dtype=np.uint16)
    loader = gpt.TokenWindows(tokens, block_size=8, stride=5, batch_size=3, shuffle=False, drop_last=False)
    assert loader.starts.tolist() == list(range(0, 92, 5))  # the last window's target is token 99 at most
    x, y = next(loader.epoch(0))
    assert x.tolist() == [list(range(s, s + 8)) for s in (0, 5, 10)]
    assert torch.equal(y, x + 1)
    assert len(loader) == 7  # 19 windows in batches of 3, the last one partial
    assert len(gpt.TokenWindows(tokens, 8, 5, 3, drop_last=True)) == 6


def test_shuffle_is_seeded_per_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    a = gpt.TokenWindows(tokens, 8, 8, 4, seed=1)
    b = gpt.TokenWindows(tokens, 8, 8, 4, seed=1)
    assert np.array_equal(a.batch_order(0), b.batch_order(0))
    assert not np.array_equal(a.batch_order(0), a.batch_order(1))
    assert sorted(a.batch_order(3).tolist()) == a.starts.tolist()
    # resuming mid-epoch yields the same batches as the uninterrupted epoch
    full = [x for x, _ in a.epoch(2)]
    tail = [x for x, _ in a.epoch(2, start_batch=5)]
    assert all(torch.equal(p, q) for p, q in zip(full[5:], tail)) and len(tail) == len(full) - 5


def test_split_shares_no_token_position():
    tokens = np.arange(1000, dtype=np.uint16)
    train, val = gpt.split_tokens(tokens, block_size=16, val_fraction=0.1)
    assert len(train) == 900 and len(val) == 100
    seen_train = {int(t) for x, y in gpt.TokenWindows(train, 16, 4, 2, drop_last=False).epoch(0)
                  for t in torch.cat([x, y], 1).flatten()}
    seen_val = {int(t) for x, y in gpt.TokenWindows(val, 16, 16, 2, shuffle=False, drop_last=False).epoch(0)
                for t in torch.cat([x, y], 1).flatten()}
    assert seen_train and seen_val and not (seen_train & seen_val)
    assert max(seen_train) < 900 <= min(seen_val)


def test_too_short_corpus_says_how_much_is_needed():
    with pytest.raises(gpt.GPTError, match=r"needs at least 2,570 tokens"):
        gpt.split_tokens(np.arange(2000, dtype=np.uint16), block_size=256, val_fraction=0.1)
