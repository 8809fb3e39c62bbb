"""Label noise: synthetic symmetric flips and transition-matrix resampling.

All functions are vectorised (no per-sample Python loop) and seeded through
``numpy.random.default_rng`` so the same seed gives the same labels on every machine.
"""
from __future__ import annotations

import numpy as np


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(rate * N)`` labels, each to a uniformly random *different* class.

    The flipped rows are the first ``round(rate * N)`` entries of a seeded permutation; each
    new label is ``(y + k) % C`` with ``k`` uniform in ``1..C-1``, i.e. uniform over the other
    ``C - 1`` classes (so a flip never keeps the label).

    Returns ``(noisy_labels [N] int64, flipped_indices [K] int64 sorted)``.
    """
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"noise rate must be in [0, 1); got {rate}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {labels.shape}")
    n = labels.shape[0]
    k = int(round(float(rate) * n))
    if k > 0 and num_classes < 2:
        raise ValueError("symmetric noise needs at least 2 classes")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{labels.min()}, "
                         f"{labels.max()}]")
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.permutation(n)[:k]).astype(np.int64)
    noisy = labels.copy()
    if k:
        offsets = rng.integers(1, num_classes, size=k)
        noisy[flipped] = (labels[flipped] + offsets) % num_classes
    return noisy, flipped


def transition_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Empirical noise transition matrix ``T [C, C]`` float64, ``T[i, j] = P(noisy=j | clean=i)``.

    Every row sums to 1; a class that never occurs as a clean label gets the identity row
    (no evidence of noise, so the label is kept).
    """
    clean = np.asarray(clean, dtype=np.int64)
    noisy = np.asarray(noisy, dtype=np.int64)
    if clean.shape != noisy.shape:
        raise ValueError(f"clean and noisy labels differ in shape: {clean.shape} vs {noisy.shape}")
    counts = np.bincount(clean * num_classes + noisy,
                         minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    counts = counts.astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    empty = totals[:, 0] == 0
    counts[empty] = np.eye(num_classes)[empty]
    totals[empty] = 1.0
    return counts / totals


def resample_from_transition(clean: np.ndarray, T: np.ndarray, seed: int) -> np.ndarray:
    """Draw each label from ``T[clean label]`` (the paper's public code's CIFAR-N variant).

    Returns ``[N]`` int64 labels. Sampling is inverse-CDF on one uniform per row.
    """
    clean = np.asarray(clean, dtype=np.int64)
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 2 or T.shape[0] != T.shape[1]:
        raise ValueError(f"T must be square [C, C]; got {T.shape}")
    if np.any(T < 0) or not np.allclose(T.sum(axis=1), 1.0):
        raise ValueError("T must have non-negative rows that sum to 1")
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(T, axis=1)
    u = rng.random(clean.shape[0])
    drawn = (u[:, None] >= cdf[clean]).sum(axis=1)
    # float rounding can leave the last cdf entry a hair below 1: clip into range
    return np.minimum(drawn, T.shape[0] - 1).astype(np.int64)
