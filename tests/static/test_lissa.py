"""LiSSA against the explicit damped inverse Hessian on a convex model (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai.estimators.lissa import hessian_vector_product, lissa_values
from tests.estimators import brute
from tests.estimators.nets import CNN
from tests.static.helpers import (assert_unchanged, rel_err,
                                  snapshot, split)

pytestmark = pytest.mark.usefixtures("float64_seeded")  # exactness needs float64


def softmax_regression_setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(6, 4)
    xt, yt = torch.randn(20, 6, generator=g), torch.randint(0, 4, (20,), generator=g)
    xv, yv = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
    xh, yh = torch.randn(30, 6, generator=g), torch.randint(0, 4, (30,), generator=g)
    return model, (xt, yt), (xv, yv), (xh, yh)


def explicit_hessian(model: nn.Linear, x, y) -> torch.Tensor:
    w, b = model.weight.detach(), model.bias.detach()

    def loss(theta):
        wt = theta[:w.numel()].view_as(w)
        bt = theta[w.numel():]
        return nn.functional.cross_entropy(x @ wt.T + bt, y)

    return torch.autograd.functional.hessian(loss, torch.cat([w.reshape(-1), b]))


def explicit_values(model, tr, va, hs, damping):
    h = explicit_hessian(model, *hs)
    names = ["weight", "bias"]
    gt = brute.per_sample_grads(model, names, *tr)
    gv = brute.per_sample_grads(model, names, *va).sum(0)
    s = torch.linalg.solve(h + damping * torch.eye(h.shape[0]), gv)
    return gt @ s, h


def test_hvp_matches_explicit_hessian():
    model, _, _, (xh, yh) = softmax_regression_setup()
    h = explicit_hessian(model, xh, yh)
    v = [torch.randn_like(model.weight), torch.randn_like(model.bias)]
    hv = hessian_vector_product(model, split(xh, yh, 30)[0], v)
    ref = h @ torch.cat([v[0].reshape(-1), v[1]])
    assert rel_err(torch.cat([hv[0].reshape(-1), hv[1]]), ref) < 1e-12


def test_lissa_converges_to_explicit_inverse():
    model, tr, va, hs = softmax_regression_setup()
    damping = 0.1
    ref, h = explicit_values(model, tr, va, hs, damping)
    scale = 1.2 * (float(torch.linalg.eigvalsh(h).max()) + damping)
    before = snapshot(model)
    hb = split(*hs, 30)
    v = lissa_values(model, split(*tr, 7), split(*va, 3), hb, damping=damping, scale=scale,
                     depth=600)
    assert v.shape == (20,)
    assert rel_err(v, ref) < 1e-3
    assert_unchanged(model, before)
    # cycling over (identical) batches and averaging repeats leaves the fixed point unchanged
    v2 = lissa_values(model, split(*tr, 7), split(*va, 3), hb + hb, damping=damping,
                      scale=scale, depth=600, repeats=2, seed=3)
    assert rel_err(v2, ref) < 1e-3


def test_lissa_sign_helps():
    """Values are positive for a sample whose gradient step lowers the validation loss:
    here the training set equals the validation set, so v_j ~ g_j^T H^-1 g_V summed >= 0."""
    model, _, va, hs = softmax_regression_setup(1)
    damping = 0.1
    ref, h = explicit_values(model, va, va, hs, damping)
    scale = 1.2 * (float(torch.linalg.eigvalsh(h).max()) + damping)
    v = lissa_values(model, split(*va, 8), split(*va, 8), split(*hs, 30), damping=damping,
                     scale=scale, depth=600)
    assert float(v.sum()) > 0 and rel_err(v, ref) < 1e-3


def test_lissa_warns_on_divergence():
    model, tr, va, hs = softmax_regression_setup()
    h = explicit_hessian(model, *hs)
    scale = 0.05 * float(torch.linalg.eigvalsh(h).max())
    with pytest.warns(RuntimeWarning, match="scale"):
        v = lissa_values(model, split(*tr, 20), split(*va, 8), split(*hs, 30), damping=0.0,
                         scale=scale, depth=2000)
    assert v.shape == (20,)


def test_lissa_train_mode_batchnorm_leaves_model_unchanged():
    model = CNN().train()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 4, (10,), generator=g)
    before = snapshot(model)
    v = lissa_values(model, split(x[:6], y[:6], 3), split(x[6:], y[6:], 4),
                     split(x, y, 5), scale=50.0, depth=5)
    assert v.shape == (6,) and torch.isfinite(v).all()
    assert_unchanged(model, before)
    assert model.training
