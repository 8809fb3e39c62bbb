"""Seeded splits: hold-out, limits and the plan a builder follows."""
import numpy as np
import pytest

from lai.config import DatasetConfig
from lai.data.splits import derive_seed, holdout_count, holdout_split, limit_indices, plan_splits


def test_holdout_count_fraction_and_count():
    assert holdout_count(50000, 0.1) == 5000
    assert holdout_count(100, 7) == 7
    assert holdout_count(5, 0.01) == 1  # never an empty validation split
    for bad in (0, -1, 100, 2.5):
        with pytest.raises(ValueError):
            holdout_count(100, bad)


def test_holdout_split_is_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    train, val = holdout_split(labels, 0.1, seed=derive_seed(0, "val"))
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(range(1000))
    np.testing.assert_array_equal(np.bincount(labels[val]), 10)  # stratified
    train2, val2 = holdout_split(labels, 0.1, seed=derive_seed(0, "val"))
    np.testing.assert_array_equal(val, val2)
    _, val3 = holdout_split(labels, 0.1, seed=derive_seed(1, "val"))
    assert not np.array_equal(val, val3)


def test_holdout_split_falls_back_when_stratifying_is_impractical():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 2])  # class 1 has a single row
    train, val = holdout_split(labels, 3, seed=0)
    assert len(val) == 3 and not set(train) & set(val) and len(train) + len(val) == 8


def test_limit_indices():
    idx = np.arange(10, 30)
    sub = limit_indices(idx, 5, seed=0)
    assert len(sub) == 5 and set(sub) <= set(idx) and np.all(np.diff(sub) > 0)
    np.testing.assert_array_equal(sub, limit_indices(idx, 5, seed=0))
    np.testing.assert_array_equal(limit_indices(idx, None, seed=0), idx)
    np.testing.assert_array_equal(limit_indices(idx, 100, seed=0), idx)


def test_plan_splits_limits_do_not_move_the_holdout():
    labels = np.repeat(np.arange(5), 40)
    full = plan_splits(labels, 50, DatasetConfig(name="x", val_size=0.2), seed=3)
    capped = plan_splits(labels, 50, DatasetConfig(name="x", val_size=0.2, train_limit=30,
                                                   val_limit=10, test_limit=7), seed=3)
    assert full.sizes() == {"train": 160, "val": 40, "test": 50}
    assert capped.sizes() == {"train": 30, "val": 10, "test": 7}
    assert set(capped.train) <= set(full.train) and set(capped.val) <= set(full.val)
    assert not set(full.train) & set(full.val)
    # the dataset's own validation split
    own = plan_splits(labels, 50, DatasetConfig(name="x", val_source="split"), seed=3,
                      n_val_split=12)
    assert not own.val_from_pool and len(own.train) == 200 and len(own.val) == 12
    with pytest.raises(ValueError, match="no validation split"):
        plan_splits(labels, 50, DatasetConfig(name="x", val_source="split"), seed=3)
    with pytest.raises(ValueError, match="val_source"):
        plan_splits(labels, 50, DatasetConfig(name="x", val_source="nope"), seed=3)
