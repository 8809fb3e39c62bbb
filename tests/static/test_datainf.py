"""DataInf against its closed form written out with explicit per-block matrices (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai.estimators.static.datainf import datainf_values, parameter_blocks
from tests.estimators import brute
from tests.estimators.nets import CNN, MLP, PaddedTransformer, token_batch
from tests.static.helpers import (assert_unchanged, rel_err,
                                  snapshot, split)

pytestmark = pytest.mark.usefixtures("float64_seeded")  # exactness needs float64

REL = 1e-6


class Branchy(nn.Module):
    """Data-dependent control flow (always the same branch): vmap refuses it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if bool((h.abs() <= 1).all()):
            h = 2 * h
        return self.b(h)


def explicit_blocks(model: nn.Module) -> list[list[str]]:
    blocks = []
    for mn, m in model.named_modules():
        names = [f"{mn}.{pn}" if mn else pn for pn, p in m._parameters.items()
                 if p is not None and p.requires_grad]
        if names:
            blocks.append(names)
    return blocks


def explicit_datainf(model, tr, va, hs, damping=None, kwargs=False):
    """sum_b g_Vb^T [1/(n l_b) sum_i (I - g_ib g_ib^T / (l_b + |g_ib|^2))] g_jb."""
    total = 0
    for names in explicit_blocks(model):
        gh = brute.per_sample_grads(model, names, *hs, kwargs).detach()
        gt = brute.per_sample_grads(model, names, *tr, kwargs).detach()
        gv = brute.per_sample_grads(model, names, *va, kwargs).detach().sum(0)
        n, d = gh.shape
        lam = damping if damping is not None else 0.1 * float(gh.pow(2).sum(1).mean()) / d
        m = torch.zeros(d, d)
        for g in gh:
            m += torch.eye(d) - torch.outer(g, g) / (lam + g @ g)
        m /= n * lam
        total = total + gt @ (m @ gv)
    return total


def data(shape, classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def strip(b: dict):
    return {k: v for k, v in b.items() if k != "labels"}, b["labels"]


CASES = {
    "mlp": (lambda: MLP(), (12,), 5),
    "cnn": (lambda: CNN().eval(), (3, 10, 10), 4),
    "branchy": (lambda: Branchy(), (5,), 3),
}


@pytest.mark.parametrize("net", list(CASES))
@pytest.mark.parametrize("damping", [None, 0.05])
def test_datainf_equals_closed_form(net, damping):
    make, shape, classes = CASES[net]
    model = make()
    tr, va, hs = (data(shape, classes, 9, 1), data(shape, classes, 5, 2),
                  data(shape, classes, 11, 3))
    ref = explicit_datainf(model, tr, va, hs, damping)
    before = snapshot(model)
    v = datainf_values(model, split(*tr, 4), split(*va, 3), split(*hs, 7), damping=damping,
                       chunk_size=4)
    assert v.shape == (9,)
    assert rel_err(v, ref) < REL
    assert_unchanged(model, before)


def test_datainf_dict_inputs_transformer():
    model = PaddedTransformer()
    tr, va, hs = (strip(token_batch(7, 9, 30, 3, s)) for s in (1, 2, 3))
    ref = explicit_datainf(model, tr, va, hs, kwargs=True)
    before = snapshot(model)
    v = datainf_values(model, split(*tr, 4), split(*va, 7), split(*hs, 5), chunk_size=3)
    assert rel_err(v, ref) < REL
    assert_unchanged(model, before)


def test_default_damping_differs_from_fixed():
    model = MLP()
    tr, va, hs = data((12,), 5, 6, 1), data((12,), 5, 4, 2), data((12,), 5, 8, 3)
    args = (split(*tr, 6), split(*va, 4), split(*hs, 8))
    a = datainf_values(model, *args)
    b = datainf_values(model, *args, damping=1.0)
    assert rel_err(a, b) > 1e-3
    assert rel_err(b, explicit_datainf(model, tr, va, hs, 1.0)) < REL


def test_blocks_group_weight_and_bias():
    assert parameter_blocks(CNN()) == explicit_blocks(CNN())
    assert parameter_blocks(CNN())[0] == ["c1.weight", "c1.bias"]


def test_datainf_train_mode_batchnorm_runs_and_restores():
    model = CNN().train()
    tr, va, hs = data((3, 8, 8), 4, 6, 1), data((3, 8, 8), 4, 4, 2), data((3, 8, 8), 4, 5, 3)
    before = snapshot(model)
    v = datainf_values(model, split(*tr, 3), split(*va, 4), split(*hs, 5))
    assert v.shape == (6,) and torch.isfinite(v).all()
    assert_unchanged(model, before)
    assert model.training


@pytest.mark.parametrize("loop_faster", [True, False])
def test_per_sample_gradients_same_whichever_way_the_timing_picks(monkeypatch, loop_faster):
    """After the first vmap chunk a few rows are timed as a loop; the faster way serves the
    later chunks, and the gradients are the same either way (and equal to brute force)."""
    import itertools

    import lai.estimators.static.datainf as di
    from lai.batching import Batch

    torch.manual_seed(0)
    model = CNN().eval()
    x, y = torch.randn(24, 3, 10, 10), torch.randint(0, 4, (24,))
    # the clock's readings: before/after vmap on the first 8 rows, before/after the 2 timed
    # loop rows; per row, vmap takes 10 and the loop 1 (or the other way round)
    v_row, l_row = (10.0, 1.0) if loop_faster else (1.0, 10.0)
    readings = itertools.chain([0.0, 8 * v_row, 8 * v_row, 8 * v_row + 2 * l_row],
                               itertools.repeat(0.0))
    monkeypatch.setattr(di, "_now", lambda like: next(readings))
    calls = {"vmap": 0}
    real_vmap = di.vmap

    def counting_vmap(*a, **k):
        calls["vmap"] += 1
        return real_vmap(*a, **k)

    monkeypatch.setattr(di, "vmap", counting_vmap)
    chunks = list(di.per_sample_gradient_chunks(model, [Batch(x, y, torch.arange(24))],
                                                chunk_size=12))
    # vmap: the trial rows only; or the trial, the first chunk's rest and the second chunk
    assert calls["vmap"] == (1 if loop_faster else 3)
    names = [n for n, _ in model.named_parameters()]
    got = torch.cat([torch.cat([c[n].reshape(c[n].shape[0], -1) for n in names], 1)
                     for c in chunks])
    ref = brute.per_sample_grads(model, names, x, y)
    assert rel_err(got, ref) < REL
