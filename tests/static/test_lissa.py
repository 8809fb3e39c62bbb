"""LiSSA against the explicit damped inverse Hessian on a convex model (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai.estimators.static.lissa import LissaDivergedError, hessian_vector_product, lissa_values
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


def test_lissa_divergence_is_an_error():
    model, tr, va, hs = softmax_regression_setup()
    h = explicit_hessian(model, *hs)
    scale = 0.05 * float(torch.linalg.eigvalsh(h).max())
    with pytest.raises(LissaDivergedError, match="diverged at step"):
        lissa_values(model, split(*tr, 20), split(*va, 8), split(*hs, 30), damping=0.0,
                     scale=scale, depth=2000)


def test_scale_from_the_data_converges_and_reports_its_residual():
    """scale=None: 1.5 x (power-iteration top eigenvalue + damping); the solve matches the
    explicit inverse, stops once converged, and reports a small residual."""
    model, tr, va, hs = softmax_regression_setup()
    damping = 0.1
    ref, h = explicit_values(model, tr, va, hs, damping)
    info = {}
    v = lissa_values(model, split(*tr, 7), split(*va, 3), split(*hs, 30), damping=damping,
                     depth=5000, tol=1e-10, info=info)
    top = float(torch.linalg.eigvalsh(h).abs().max())
    # power iteration approaches the top eigenvalue from below; 1.5x covers the rest
    assert 0.85 * top <= info["top_eigenvalue"] <= top * (1 + 1e-9)
    assert info["scale"] == pytest.approx(1.5 * (info["top_eigenvalue"] + damping))
    assert rel_err(v, ref) < 1e-6 and info["residual"] < 1e-6
    assert info["steps"][0] < 5000  # stopped on convergence
    short = {}
    lissa_values(model, split(*tr, 7), split(*va, 3), split(*hs, 30), damping=damping,
                 depth=3, info=short)
    assert short["steps"] == [3] and short["residual"] > 10 * info["residual"]


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


def test_sdpa_attention_runs_by_the_math_backend():
    """Fused attention has no double backward: LiSSA's HVPs run PyTorch's math backend, and
    sdpa BERT gives eager BERT's values."""
    transformers = pytest.importorskip("transformers")
    from tests.estimators.nets import token_batch

    def bert(attn):
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16,
                                      num_labels=3, attn_implementation=attn)
        return transformers.BertForSequenceClassification(cfg).eval()

    tr, va = token_batch(4, 6, 30, 3, seed=0), token_batch(3, 6, 30, 3, seed=1)
    from lai import value
    eager = value(bert("eager"), tr, va, method="lissa", depth=5, scale=10.0)
    fused = value(bert("sdpa"), tr, va, method="lissa", depth=5, scale=10.0)
    assert rel_err(fused, eager) < 1e-9


def test_an_op_without_second_derivative_is_named():
    class HardNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(nn.functional.hardsigmoid(self.a(x)))

    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    from lai import value
    with pytest.raises(NotImplementedError, match="hardsigmoid_backward.*use ip or datainf"):
        value(HardNet(), (x, y), (x, y), method="lissa", depth=2)
