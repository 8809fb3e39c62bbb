"""Seeded index plans: clean hold-out validation, and train/val/test size caps.

Every function works on *indices*, so a builder decides which rows it needs before it
materialises (decodes, tokenises) anything. Each random choice gets its own seed derived from
the run seed and a purpose string, so e.g. changing ``train_limit`` never changes which rows
are held out for validation, and the same run seed always gives the same split.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

VAL_SOURCES = ("holdout", "split")


def derive_seed(seed: int, purpose: str) -> int:
    """A 32-bit seed for one random choice (``purpose``, e.g. ``"val"``) of run ``seed``."""
    key = zlib.crc32(purpose.encode("utf-8"))
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, key]).generate_state(1)[0])


def holdout_count(n: int, val_size: float) -> int:
    """Rows to hold out of ``n``: ``max(1, round(val_size * n))`` for a fraction ``< 1``, else
    the count ``val_size``.

    Raises ``ValueError`` unless ``1 <= count < n``.
    """
    if val_size <= 0:
        raise ValueError(f"val_size must be > 0 (a fraction < 1 or a count >= 1); got {val_size}")
    # a tiny pool still gets one validation row rather than an empty (useless) split
    count = max(1, int(round(val_size * n))) if val_size < 1 else int(val_size)
    if val_size >= 1 and count != val_size:
        raise ValueError(f"val_size >= 1 is a row count and must be an integer; got {val_size}")
    if not 1 <= count < n:
        raise ValueError(f"val_size={val_size} holds out {count} of {n} rows; "
                         f"need 1 <= count < {n}")
    return count


def holdout_split(labels: np.ndarray, val_size: float, seed: int,
                  stratify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices ``0..N-1`` into ``(train_idx, val_idx)``, both sorted int64.

    ``labels`` ``[N]`` are the *clean* labels; the split is stratified by them when every
    class has at least two rows and the hold-out can hold one of each class, else it falls
    back to a plain seeded random split (also with ``stratify=False``).
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    count = holdout_count(n, val_size)
    rows = np.arange(n, dtype=np.int64)
    if stratify:
        _, class_counts = np.unique(labels, return_counts=True)
        practical = class_counts.min() >= 2 and len(class_counts) <= min(count, n - count)
        if practical:
            from sklearn.model_selection import train_test_split

            train, val = train_test_split(rows, test_size=count, random_state=seed,
                                          stratify=labels)
            return np.sort(train), np.sort(val)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[count:]), np.sort(perm[:count])


def limit_indices(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """A seeded subset of ``min(limit, len(indices))`` of ``indices`` (sorted); all if ``None``."""
    indices = np.asarray(indices, dtype=np.int64)
    if limit is None or limit >= len(indices):
        return indices
    if limit < 1:
        raise ValueError(f"a size limit must be >= 1 or None; got {limit}")
    chosen = np.random.default_rng(seed).choice(len(indices), size=int(limit), replace=False)
    return indices[np.sort(chosen)]


@dataclass
class SplitPlan:
    """Which rows make each split.

    ``train``: indices into the training pool. ``val``: indices into the pool when
    ``val_from_pool`` (clean hold-out), else into the dataset's own validation split.
    ``test``: indices into the test set. All sorted int64.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_from_pool: bool

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def plan_splits(pool_clean_labels: np.ndarray, n_test: int, cfg: Any, seed: int,
                n_val_split: int | None = None, stratify: bool = True) -> SplitPlan:
    """Plan train/val/test rows from a config (``val_source``, ``val_size`` and the limits).

    ``pool_clean_labels`` ``[N]``: clean labels of the training pool (used to stratify the
    hold-out). ``n_val_split``: size of the dataset's own validation split, or ``None`` when
    it has none (then ``val_source="split"`` is refused).
    """
    val_source = getattr(cfg, "val_source", "holdout")
    n_pool = len(pool_clean_labels)
    if val_source == "holdout":
        train, val = holdout_split(pool_clean_labels, cfg.val_size, derive_seed(seed, "val"),
                                   stratify=stratify)
        from_pool = True
    elif val_source == "split":
        if n_val_split is None:
            raise ValueError(f"dataset {cfg.name!r} has no validation split of its own; use "
                             "val_source=holdout")
        train, val = np.arange(n_pool, dtype=np.int64), np.arange(n_val_split, dtype=np.int64)
        from_pool = False
    else:
        raise ValueError(f"val_source must be one of {VAL_SOURCES}; got {val_source!r}")
    return SplitPlan(
        train=limit_indices(train, cfg.train_limit, derive_seed(seed, "train_limit")),
        val=limit_indices(val, cfg.val_limit, derive_seed(seed, "val_limit")),
        test=limit_indices(np.arange(n_test, dtype=np.int64), cfg.test_limit,
                           derive_seed(seed, "test_limit")),
        val_from_pool=from_pool,
    )
