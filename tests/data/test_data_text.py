"""Text classification builders: synthetic files in tmp_path, and the shared real data."""
import json
import time

import numpy as np
import pytest
import torch

from lai.data import MissingDataError, build_data
from lai.data.files import write_jsonl_gz

SHARED_TEXT = ["news20_n", "emotion_n", "glue_sst2", "glue_mrpc", "glue_rte"]


class CountingTokenizer:
    """Wraps a tokenizer and counts the texts it is asked to encode."""

    def __init__(self, tok):
        self.tok, self.seen = tok, 0
        self.pad_token_id, self.eos_token_id = tok.pad_token_id, tok.eos_token_id

    def __len__(self):
        return len(self.tok)

    def __call__(self, texts, *args, **kwargs):
        self.seen += len(texts)
        return self.tok(texts, *args, **kwargs)


def _row_ids(split, decode_bytes) -> np.ndarray:
    """Row numbers of synthetic texts "<prefix> <i> ..." decoded from the token ids."""
    return np.array([int(decode_bytes(r).split()[1]) for r in split.inputs["input_ids"]])


@pytest.fixture
def emotion_dir(tmp_path):
    """A tiny Emotion folder: 120 train / 30 validation / 30 test rows, 6 classes."""
    folder = tmp_path / "emotion"
    for split, n in (("train", 120), ("validation", 30), ("test", 30)):
        write_jsonl_gz(folder / f"{split}.jsonl.gz",
                       {"text": [f"{split} {i} feeling {'x' * (i % 7)}" for i in range(n)],
                        "label": [i % 6 for i in range(n)]})
    (folder / "labels.json").write_text(json.dumps(["a", "b", "c", "d", "e", "f"]))
    return tmp_path


def test_emotion_holdout_noise_and_clean_val(emotion_dir, make_cfg, check_classification,
                                             tokenizer, decode_bytes):
    cfg = make_cfg("emotion_n", train_limit=None, val_limit=None, test_limit=None, max_length=32)
    b = build_data(cfg, data_dir=emotion_dir, seed=0, tokenizer=tokenizer)
    clean = np.arange(120) % 6
    tr, va = _row_ids(b.train, decode_bytes), _row_ids(b.val, decode_bytes)
    assert len(va) == 12 and len(tr) == 108 and not set(tr) & set(va)
    np.testing.assert_array_equal(b.val.labels.numpy(), clean[va])
    np.testing.assert_array_equal(b.clean_train_labels, clean[tr])
    assert b.info["noise_rate_pool"] == pytest.approx(48 / 120)  # exactly round(0.4 * 120) flips
    assert b.class_names == ["a", "b", "c", "d", "e", "f"]
    check_classification(b, make_cfg("emotion_n", train_limit=200, val_limit=200, test_limit=200))
    ids = b.train.inputs["input_ids"]
    assert ids.shape == (108, 32) and ids.dtype == torch.long
    torch.testing.assert_close(b.train.lengths, b.train.inputs["attention_mask"].sum(1))
    batch = b.train.collate([0, 1, 2])
    assert batch.inputs["input_ids"].shape[1] == int(b.train.lengths[:3].max())  # trimmed
    again = build_data(cfg, data_dir=emotion_dir, seed=0, tokenizer=tokenizer)
    np.testing.assert_array_equal(again.noisy, b.noisy)  # same seed, same noise and split


def test_emotion_val_split_paper_code_and_no_noise(emotion_dir, make_cfg, tokenizer,
                                                   decode_bytes):
    paper = (np.arange(120) + 1) % 6
    np.savez(emotion_dir / "emotion" / "paper_noisy_labels.npz", train_noisy_label=paper)
    cfg = make_cfg("emotion_n", val_source="split", noise="paper_code", train_limit=None,
                   val_limit=None)
    b = build_data(cfg, data_dir=emotion_dir, seed=0, tokenizer=tokenizer)
    assert len(b.train) == 120 and len(b.val) == 30
    assert all(decode_bytes(r).startswith("validation") for r in b.val.inputs["input_ids"])
    tr = _row_ids(b.train, decode_bytes)
    np.testing.assert_array_equal(b.train.labels.numpy(), paper[tr])
    assert b.noisy.all()
    none = build_data(make_cfg("emotion_n", noise="none"), data_dir=emotion_dir, seed=0,
                      tokenizer=tokenizer)
    assert not none.noisy.any()


def test_only_used_rows_are_tokenised(emotion_dir, make_cfg, tokenizer):
    counting = CountingTokenizer(tokenizer)
    cfg = make_cfg("emotion_n", train_limit=10, val_limit=5, test_limit=7)
    b = build_data(cfg, data_dir=emotion_dir, seed=0, tokenizer=counting)
    assert counting.seen == 10 + 5 + 7 == len(b.train) + len(b.val) + len(b.test)


def test_glue_pairs_no_noise_and_val_split_refused(tmp_path, make_cfg, tokenizer, decode_bytes):
    folder = tmp_path / "glue" / "mrpc"
    for split, n in (("train", 50), ("validation", 10)):
        write_jsonl_gz(folder / f"{split}.jsonl.gz",
                       {"text_a": [f"{split} {i} first" for i in range(n)],
                        "text_b": [f"second {i}" for i in range(n)],
                        "label": [i % 2 for i in range(n)]})
    b = build_data(make_cfg("glue_mrpc", test_limit=None), data_dir=tmp_path, seed=0,
                   tokenizer=tokenizer)
    assert b.noisy is None and b.clean_train_labels is None and b.num_classes == 2
    assert len(b.test) == 10 and "hidden" in " ".join(b.info["notes"])
    row = decode_bytes(b.test.inputs["input_ids"][0])
    assert row.startswith("validation") and "second" in row  # both segments encoded
    with pytest.raises(ValueError, match="val == test"):
        build_data(make_cfg("glue_mrpc", val_source="split"), data_dir=tmp_path, seed=0,
                   tokenizer=tokenizer)
    with pytest.raises(ValueError, match="noise"):
        build_data(make_cfg("glue_mrpc", noise="symmetric"), data_dir=tmp_path, seed=0,
                   tokenizer=tokenizer)


def test_news20_rejects_paper_code_and_split(tmp_path, make_cfg, tokenizer):
    folder = tmp_path / "20newsgroups"
    write_jsonl_gz(folder / "train.jsonl.gz", {"text": ["a"] * 40, "label": [0, 1] * 20})
    write_jsonl_gz(folder / "test.jsonl.gz", {"text": ["b"] * 4, "label": [0, 1] * 2})
    with pytest.raises(ValueError, match="SetFit"):
        build_data(make_cfg("news20_n", noise="paper_code"), data_dir=tmp_path, seed=0,
                   tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no validation split"):
        build_data(make_cfg("news20_n", val_source="split"), data_dir=tmp_path, seed=0,
                   tokenizer=tokenizer)


def test_missing_text_names_files(tmp_path, make_cfg, tokenizer):
    with pytest.raises(MissingDataError) as e:
        build_data(make_cfg("emotion_n"), data_dir=tmp_path, seed=0, tokenizer=tokenizer)
    msg = str(e.value)
    assert "emotion/train.jsonl.gz" in msg and "emotion/test.jsonl.gz" in msg
    assert "dair-ai/emotion" in msg and "LAI_DATA" in msg and "data_dir=" in msg


# ----------------------------------------------------------------------------- shared data

@pytest.mark.parametrize("name", SHARED_TEXT)
def test_shared_text_builds(shared_data, name, make_cfg, check_classification, tokenizer):
    cfg = make_cfg(name)
    b = build_data(cfg, data_dir=shared_data, seed=0, tokenizer=tokenizer)
    check_classification(b, cfg)
    batch = b.train.collate(list(range(8)))
    assert set(batch.inputs) == {"input_ids", "attention_mask"}
    assert batch.inputs["input_ids"].shape == batch.inputs["attention_mask"].shape
    assert batch.inputs["input_ids"].shape[0] == 8 and batch.inputs["input_ids"].shape[1] <= 128
    if name.startswith("glue_"):
        assert b.noisy is None
    else:
        assert b.info["noise_rate_pool"] == pytest.approx(0.4, abs=1e-3)


def test_shared_emotion_paper_code(shared_data, make_cfg, tokenizer):
    cfg = make_cfg("emotion_n", noise="paper_code", val_source="split")
    b = build_data(cfg, data_dir=shared_data, seed=0, tokenizer=tokenizer)
    assert b.info["noise"] == "paper_code"
    assert b.info["noise_rate_pool"] == pytest.approx(0.40, abs=0.005)  # README: 59.99% agree


def test_shared_qnli_train_is_missing(shared_data, make_cfg, tokenizer):
    if (shared_data / "glue" / "qnli" / "train.jsonl.gz").exists():
        pytest.skip("this data folder has QNLI train")
    with pytest.raises(MissingDataError, match="glue/qnli/train.jsonl.gz"):
        build_data(make_cfg("glue_qnli"), data_dir=shared_data, seed=0, tokenizer=tokenizer)


def test_shared_qnli_download_fails_fast_offline(shared_data, make_cfg, tokenizer, offline):
    if (shared_data / "glue" / "qnli" / "train.jsonl.gz").exists():
        pytest.skip("this data folder has QNLI train")
    start = time.monotonic()
    with pytest.raises(MissingDataError) as e:
        build_data(make_cfg("glue_qnli", download=True), data_dir=shared_data, seed=0,
                   tokenizer=tokenizer)
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "glue/qnli/train.jsonl.gz" in msg and "Download attempted and failed" in msg
    assert "'glue', 'qnli'" in msg


class _FakeHFSplit:
    """Just enough of a Hugging Face ``Dataset``: column access and label names."""

    def __init__(self, columns, names):
        self.columns = columns
        self.features = {"label": type("ClassLabel", (), {"names": names})()}

    def __getitem__(self, key):
        return self.columns[key]


def test_download_fallback_writes_prepared_files(tmp_path, make_cfg, tokenizer, monkeypatch):
    calls = []

    def fake_load(path, name=None, **kwargs):
        calls.append((path, name))
        split = lambda n: _FakeHFSplit(  # noqa: E731
            {"sentence1": [f"a {i}" for i in range(n)], "sentence2": [f"b {i}" for i in range(n)],
             "label": [i % 2 for i in range(n)], "idx": list(range(n))}, ["ent", "not_ent"])
        return {"train": split(40), "validation": split(10)}

    monkeypatch.setattr("lai.data.text.hf_load_dataset", fake_load)
    cfg = make_cfg("glue_rte", download=True)
    b = build_data(cfg, data_dir=tmp_path, seed=0, tokenizer=tokenizer)
    assert calls == [("glue", "rte")] and b.info["source"] == "download"
    assert (tmp_path / "glue" / "rte" / "train.jsonl.gz").is_file()
    assert b.class_names == ["ent", "not_ent"] and len(b.test) == 10
    again = build_data(cfg, data_dir=tmp_path, seed=0, tokenizer=tokenizer)  # now local
    assert calls == [("glue", "rte")] and again.info["source"] == "prepared"
