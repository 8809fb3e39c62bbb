"""Shared helpers for the static-estimator tests (float64, CPU)."""
from __future__ import annotations

import torch

from lai.batching import Batch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def split(x, y, size: int) -> list[Batch]:
    """A list of Batches of at most ``size`` rows (x: tensor or dict of tensors)."""
    out = []
    for s in range(0, len(y), size):
        rows = slice(s, s + size)
        xi = {k: v[rows] for k, v in x.items()} if isinstance(x, dict) else x[rows]
        out.append(Batch(xi, y[rows]))
    return out


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, t in after.items():
        assert torch.equal(t, before[k]), k


