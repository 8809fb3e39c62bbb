"""Causal-LM data: blocks, shifted labels, the stand-in corpus."""
import numpy as np
import pytest
import torch

from lai.batching import IGNORE_INDEX, per_sample_loss
from lai.data import MissingDataError, build_data
from lai.data.files import write_jsonl_gz
from lai.data.lm import documents_to_blocks, pool_blocks_needed, shift_labels


def _corpus(root, folder, n_docs=60):
    for split, n in (("train", n_docs), ("validation", n_docs // 4)):
        write_jsonl_gz(root / folder / f"{split}.jsonl.gz",
                       {"text": [f"{folder} {split} document {i}. " * 5 for i in range(n)]})


def test_blocks_and_shift(tokenizer):
    blocks = documents_to_blocks(tokenizer, ["abc", "defg"], block_size=3)
    eos = tokenizer.eos_token_id
    stream = [*b"abc", eos, *b"defg", eos]
    assert torch.equal(blocks, torch.tensor(stream[:9]).view(3, 3))
    labels = shift_labels(blocks)
    assert torch.equal(labels[:, :-1], blocks[:, 1:]) and (labels[:, -1] == IGNORE_INDEX).all()
    capped = documents_to_blocks(tokenizer, ["abcdefgh"] * 100, block_size=4, max_blocks=5,
                                 chunk_docs=2)
    assert capped.shape == (5, 4)


def test_pool_blocks_needed():
    assert pool_blocks_needed(None, 0.1) is None
    for limit in (1, 7, 64, 1000):
        n = pool_blocks_needed(limit, 0.1)
        assert n - max(1, round(0.1 * n)) >= limit
    assert pool_blocks_needed(10, 5) == 15
    n = pool_blocks_needed(10, 0.1, val_limit=32)
    assert round(0.1 * n) >= 32 and n - round(0.1 * n) >= 10


def test_pile_prefers_real_pile_and_labels_align(tmp_path, make_cfg, tokenizer):
    _corpus(tmp_path, "pile_standin")
    _corpus(tmp_path, "pile")
    cfg = make_cfg("pile", block_size=16, train_limit=20, val_limit=4, test_limit=6)
    b = build_data(cfg, data_dir=tmp_path, seed=0, tokenizer=tokenizer)
    assert b.task == "lm" and b.num_classes == len(tokenizer)
    assert not b.info["standin"] and "pile/train.jsonl.gz" in b.info["files"][0]
    assert (len(b.train), len(b.val), len(b.test)) == (20, 4, 6)
    batch = b.train.collate(list(range(5)))
    ids, labels = batch.inputs["input_ids"], batch.labels
    assert ids.shape == labels.shape == (5, 16) and ids.dtype == labels.dtype == torch.long
    assert (batch.inputs["attention_mask"] == 1).all()
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == IGNORE_INDEX).all()
    logits = torch.randn(5, 16, len(tokenizer))
    assert per_sample_loss(logits, labels).shape == (5,)
    assert b.noisy is None
    with pytest.raises(ValueError, match="holdout"):
        build_data(make_cfg("pile", val_source="split"), data_dir=tmp_path, seed=0,
                   tokenizer=tokenizer)


def test_pile_missing(tmp_path, make_cfg, tokenizer):
    with pytest.raises(MissingDataError) as e:
        build_data(make_cfg("pile"), data_dir=tmp_path, seed=0, tokenizer=tokenizer)
    assert "pile/train.jsonl.gz" in str(e.value) and "pile_standin/train.jsonl.gz" in str(e.value)


def test_shared_pile_standin(shared_data, make_cfg, tokenizer):
    if (shared_data / "pile" / "train.jsonl.gz").exists():
        pytest.skip("this data folder has a real Pile sample")
    cfg = make_cfg("pile", train_limit=64)
    b = build_data(cfg, data_dir=shared_data, seed=0, tokenizer=tokenizer)
    assert b.info["standin"] and "SUBSTITUTE" in b.info["corpus"]
    assert "WikiText" in b.info["corpus"] and "Gutenberg" in b.info["corpus"]
    assert len(b.train) == 64 and len(b.test) == 32 and b.train.labels.shape == (64, 128)
    full = make_cfg("pile", train_limit=None, val_limit=None, test_limit=None)
    whole = build_data(full, data_dir=shared_data, seed=0, tokenizer=tokenizer)
    # the byte-level stand-in has ~2.9 M training bytes -> ~22 k blocks of 128
    assert len(whole.train) + len(whole.val) == whole.info["pool_blocks"] > 10000
    assert np.isclose(len(whole.val) / whole.info["pool_blocks"], 0.1, atol=0.01)
