"""TRAK against the explicit (unprojected) Gauss-Newton influence of the margin (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from lai.estimators.static.trak import margins, trak_values
from tests.estimators import brute
from tests.estimators.nets import MLP
from tests.static.helpers import (assert_unchanged, rel_err,
                                  snapshot, split)

pytestmark = pytest.mark.usefixtures("float64_seeded")  # exactness needs float64


def margin_ref(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(p_y / (1 - p_y)) of one sample (token mean for [1, T, V], -100 ignored)."""
    p = logits.softmax(-1)
    if logits.dim() == 2:
        py = p[0, labels[0]]
        return torch.log(py) - torch.log1p(-py)
    keep = labels[0] != -100
    py = p[0][keep].gather(-1, labels[0][keep].unsqueeze(-1)).squeeze(-1)
    return (torch.log(py) - torch.log1p(-py)).mean()


def residual_ref(model, x, y) -> torch.Tensor:
    with torch.no_grad():
        p = model(x).softmax(-1)
    if p.dim() == 2:
        return 1 - p.gather(1, y[:, None]).squeeze(1)
    keep = (y != -100)
    py = p.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return ((1 - py) * keep).sum(1) / keep.sum(1)


def explicit_gn(model, tr, va, damping):
    """v_j = (sum_z grad f_z)^T (G^T G + damping I)^{-1} grad f_j (1 - p_{y_j})."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gt = brute.per_sample_grads(model, names, *tr, loss_fn=margin_ref).detach()
    gv = brute.per_sample_grads(model, names, *va, loss_fn=margin_ref).detach().sum(0)
    k = gt.T @ gt + damping * torch.eye(gt.shape[1])
    return (gt @ torch.linalg.lstsq(k, gv).solution) * residual_ref(model, *tr)


def data(d, classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 7, dim: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def lm_data(n, t, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[torch.rand(n, t, generator=g) < 0.3] = -100
    labels[:, 0] = ids[:, 1]  # at least one real token per sample
    return ids[:, :-1], labels


def test_margin_matches_definition():
    logits = torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    f, q = margins(logits, y)
    ref = torch.stack([margin_ref(logits[i:i + 1], y[i:i + 1]) for i in range(6)])
    assert rel_err(f, ref) < 1e-12
    assert rel_err(q, 1 - logits.softmax(-1).gather(1, y[:, None]).squeeze(1)) < 1e-12


def test_trak_full_projection_ranks_like_gauss_newton():
    model = MLP(d_in=4, hidden=4, classes=3)
    n_params = sum(p.numel() for p in model.parameters())
    tr, va = data(4, 3, 120, 1), data(4, 3, 10, 2)
    ref = explicit_gn(model, tr, va, 1e-8)
    before = snapshot(model)
    v = trak_values(model, split(*tr, 50), split(*va, 4), proj_dim=2 * n_params,
                    damping=1e-8, chunk_size=16)
    assert v.shape == (120,) and v.dtype == torch.float64
    assert spearmanr(v.numpy(), ref.numpy()).statistic > 0.9
    assert_unchanged(model, before)
    # pseudo-inverse path (damping 0): the same values
    v0 = trak_values(model, split(*tr, 50), split(*va, 4), proj_dim=2 * n_params)
    assert spearmanr(v0.numpy(), ref.numpy()).statistic > 0.9


def test_trak_language_model_labels():
    model = TinyLM()
    n_params = sum(p.numel() for p in model.parameters())
    tr, va = lm_data(90, 5, 7, 1), lm_data(6, 5, 7, 2)
    ref = explicit_gn(model, tr, va, 1e-8)
    v = trak_values(model, split(*tr, 40), split(*va, 6), proj_dim=2 * n_params,
                    damping=1e-8)
    assert spearmanr(v.numpy(), ref.numpy()).statistic > 0.9


def test_trak_seed_determinism_and_checkpoints():
    model = MLP(d_in=4, hidden=4, classes=3)
    tr, va = data(4, 3, 30, 1), data(4, 3, 6, 2)
    args = (split(*tr, 16), split(*va, 6))
    a = trak_values(model, *args, proj_dim=16, seed=5, damping=1e-3)
    b = trak_values(model, *args, proj_dim=16, seed=5, damping=1e-3)
    c = trak_values(model, *args, proj_dim=16, seed=6, damping=1e-3)
    assert torch.equal(a, b) and not torch.allclose(a, c)

    other = MLP(d_in=4, hidden=4, classes=3)
    states = [copy.deepcopy(model.state_dict()), copy.deepcopy(other.state_dict())]
    before = snapshot(model)
    ens = trak_values(model, *args, proj_dim=16, seed=5, damping=1e-3, checkpoints=states)
    assert_unchanged(model, before)
    single = trak_values(other, *args, proj_dim=16, seed=5, damping=1e-3)
    assert rel_err(ens, (a + single) / 2) < 1e-12


def test_trak_memory_budget():
    model = MLP(d_in=4, hidden=4, classes=3)
    tr, va = data(4, 3, 10, 1), data(4, 3, 4, 2)
    with pytest.raises(MemoryError, match="GiB"):
        trak_values(model, split(*tr, 10), split(*va, 4), memory_budget_bytes=1000)


def test_trak_train_mode_batchnorm_runs_and_restores():
    from tests.estimators.nets import CNN

    model = CNN().train()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 4, (10,), generator=g)
    before = snapshot(model)
    v = trak_values(model, split(x[:6], y[:6], 3), split(x[6:], y[6:], 4), proj_dim=32,
                    damping=1e-3)
    assert v.shape == (6,) and torch.isfinite(v).all()
    assert_unchanged(model, before)
