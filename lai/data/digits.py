"""Digits-N: scikit-learn's bundled 8x8 digits with 40% symmetric label noise.

A CPU-sized stand-in for the noisy-label classification experiments: 1,797 images ship with
scikit-learn (no download). Inputs are flattened float32 ``[N, 64]`` in ``[0, 1]`` for an MLP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lai.data.base import DataBundle, TensorSplit
from lai.data.registry import register_dataset
from lai.data.noise import symmetric_noise
from lai.data.splits import derive_seed, plan_splits

TEST_FRACTION = 0.2
NOISE_KINDS = ("default", "symmetric", "none")


def build_digits(cfg: Any, *, data_dir: Path | None = None, seed: int = 0,
                 tokenizer: Any = None) -> DataBundle:
    """A digits :class:`DataBundle`.

    test: a seeded, stratified 20% of the images (clean labels); pool: the rest, with
    ``noise_rate`` symmetric noise (seeded); val: clean hold-out of ``val_size`` of the pool;
    train: the remaining pool rows (noisy labels). Inputs float32 ``[n, 64]``, labels ``[n]``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if cfg.val_source != "holdout":
        raise ValueError("digits_n: val_source=split is not available (no validation split); "
                         "use val_source=holdout")
    if cfg.noise not in NOISE_KINDS:
        raise ValueError(f"digits_n: noise must be one of {NOISE_KINDS}; got {cfg.noise!r}")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values are 0..16
    y = digits.target.astype(np.int64)
    rows = np.arange(len(y))
    pool_rows, test_rows = train_test_split(rows, test_size=TEST_FRACTION, stratify=y,
                                            random_state=derive_seed(seed, "test"))
    pool_rows, test_rows = np.sort(pool_rows), np.sort(test_rows)
    clean = y[pool_rows]
    if cfg.noise == "none":
        labels = clean.copy()
    else:
        labels, _ = symmetric_noise(clean, cfg.noise_rate, 10, derive_seed(seed, "noise"))
    plan = plan_splits(clean, len(test_rows), cfg, seed)

    def split(rows_x: np.ndarray, labels_: np.ndarray) -> TensorSplit:
        return TensorSplit(torch.from_numpy(x[rows_x]), torch.from_numpy(labels_))

    tr, va = plan.train, plan.val
    noisy = labels[tr] != clean[tr]
    info = {
        "name": "digits_n", "source": "sklearn.datasets.load_digits (bundled)",
        "pool_size": len(pool_rows), "test_pool_size": len(test_rows), **plan.sizes(),
        "val_source": "holdout (clean labels, stratified)", "test_source": "stratified 20% (clean)",
        "noise": "none" if cfg.noise == "none" else "symmetric",
        "noise_rate_target": 0.0 if cfg.noise == "none" else float(cfg.noise_rate),
        "noise_rate_pool": float(np.mean(labels != clean)),
        "noise_rate_train": float(noisy.mean()) if len(noisy) else 0.0,
    }
    return DataBundle(
        name="digits_n", task="classification", num_classes=10,
        train=split(pool_rows[tr], labels[tr]),
        val=split(pool_rows[va], clean[va]),
        test=split(test_rows[plan.test], y[test_rows[plan.test]]),
        noisy=noisy, clean_train_labels=clean[tr].copy(),
        class_names=[str(i) for i in range(10)], info=info,
    )


register_dataset("digits_n", build_digits)  # bundled with scikit-learn: no files
