"""TRAK's random projection: keeping P between calls gives the same numbers as regenerating
it block by block, and the memory estimate counts a kept P."""
from __future__ import annotations

import torch

from lai.estimators.static import trak


def test_cached_projection_equals_regenerated(monkeypatch):
    monkeypatch.setattr(trak, "PROJ_BLOCK_ELEMS", 64)  # many blocks on a small problem
    g1, g2 = torch.randn(3, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
    kept = trak._Projector(50, 8, seed=7, device=torch.device("cpu"), dtype=torch.float64)
    fresh = trak._Projector(50, 8, seed=7, device=torch.device("cpu"), dtype=torch.float64,
                            cache_elems=0)
    assert kept.cache == [] and fresh.cache is None
    for g in (g1, g2, g1):  # the second and third calls read the kept blocks
        assert torch.equal(kept(g), fresh(g))
    assert sum(b.shape[0] for b in kept.cache) == 50
    # it is the documented P = randn(50, 8) / sqrt(8), generated in blocks of 8 rows
    gen = torch.Generator().manual_seed(7)
    full = torch.cat([torch.randn(8, 8, generator=gen, dtype=torch.float64) for _ in range(6)]
                     + [torch.randn(2, 8, generator=gen, dtype=torch.float64)])
    assert torch.allclose(kept(g1), g1 @ full / 8 ** 0.5)


def test_memory_estimate_counts_a_kept_projection():
    small = trak.trak_memory_estimate(100, 16, 4, 1000)
    assert small >= 4 * 1000 * 16  # the whole P is held
    big_params = trak.PROJ_CACHE_ELEMS  # P of PROJ_CACHE_ELEMS * 16 entries is not kept
    big = trak.trak_memory_estimate(100, 16, 4, big_params)
    assert big < 4 * big_params * 16
