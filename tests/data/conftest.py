"""Fixtures for the data tests: the shared data folder, a tokenizer, configs, offline mode."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lai.config import DatasetConfig

# /work/shared/data when the repository is /work/main (see DESIGN.md section 3)
DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def shared_data_dir() -> Path | None:
    """The shared real-data folder ($LAI_DATA, else ../shared/data), or None when absent."""
    for candidate in (os.environ.get("LAI_DATA"), DEFAULT_SHARED):
        if candidate and (Path(candidate) / "README.md").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip(f"shared data not found (set LAI_DATA or provide {DEFAULT_SHARED})")
    return path


class FakeByteTokenizer:
    """A minimal byte tokenizer with the Hugging Face call convention (ids < 256 are bytes).

    Used only when lai.models.tokenizers.ByteTokenizer is unavailable.
    """

    pad_token_id, cls_token_id, sep_token_id = 256, 257, 258
    eos_token_id = sep_token_id

    def __len__(self) -> int:
        return 259

    def __call__(self, texts, text_pair=None, truncation=False, max_length=None,
                 padding=False, return_tensors=None, add_special_tokens=True):
        rows = []
        pairs = text_pair if text_pair is not None else [None] * len(texts)
        for a, b in zip(texts, pairs, strict=True):
            ids = list(a.encode())
            if add_special_tokens:
                ids = [self.cls_token_id] + ids + [self.sep_token_id]
            if b is not None:
                ids += list(b.encode()) + ([self.sep_token_id] if add_special_tokens else [])
            if truncation and max_length:
                ids = ids[:max_length]
            rows.append(ids)
        if return_tensors != "pt":
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def tokenizer():
    try:
        from lai.models.tokenizers import ByteTokenizer
    except Exception:  # another team's module: the data tests must not depend on it
        return FakeByteTokenizer()
    return ByteTokenizer()


def _decode_bytes(ids: torch.Tensor) -> str:
    """The text bytes of one token row (byte tokenizers: ids < 256 are bytes)."""
    ids = ids[ids < 256]
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


def _make_cfg(name: str, **kw) -> DatasetConfig:
    """A DatasetConfig with small limits and downloads off unless overridden."""
    base = dict(train_limit=64, val_limit=32, test_limit=32, download=False)
    base.update(kw)
    return DatasetConfig(name=name, **base)


@pytest.fixture
def offline(monkeypatch):
    """Simulate a machine whose network hangs: every connection blocks for 30 s.

    With LAI_DOWNLOAD_TIMEOUT=1 a download attempt must give up after about a second.
    """
    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("simulated hang")

    monkeypatch.setenv("LAI_DOWNLOAD_TIMEOUT", "1")
    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(socket, "getaddrinfo", hang)
    yield


def _check_classification(bundle, cfg) -> None:
    """Shapes, dtypes and noise bookkeeping every classification bundle must satisfy."""
    assert bundle.task == "classification"
    assert len(bundle.train) <= cfg.train_limit and len(bundle.train) > 0
    assert 0 < len(bundle.val) <= cfg.val_limit and 0 < len(bundle.test) <= cfg.test_limit
    for split in (bundle.train, bundle.val, bundle.test):
        batch = split.collate(list(range(min(8, len(split)))))
        assert batch.labels.dtype == torch.long and batch.labels.dim() == 1
        assert int(batch.labels.min()) >= 0 and int(batch.labels.max()) < bundle.num_classes
        assert torch.equal(batch.idx, torch.arange(len(batch)))
    json.dumps(bundle.info)  # the info dict goes into the JSON run record
    if bundle.noisy is not None:
        labels = bundle.train.labels.numpy()
        assert bundle.noisy.dtype == bool and bundle.noisy.shape == (len(bundle.train),)
        np.testing.assert_array_equal(bundle.noisy, labels != bundle.clean_train_labels)


# Helpers are served as fixtures (not imported from this file) so the tests work under any
# pytest import mode and beside other folders' conftest.py files.
@pytest.fixture(scope="session")
def make_cfg():
    return _make_cfg


@pytest.fixture(scope="session")
def check_classification():
    return _check_classification


@pytest.fixture(scope="session")
def decode_bytes():
    return _decode_bytes
