"""The paper code's flattened Ghost: exact on an MLP, a different number (and the formula
written out by hand) on convolutions and token sequences."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import value
from tests.estimators import brute
from tests.estimators.nets import CNN, MLP, PaddedTransformer, token_batch

pytestmark = pytest.mark.usefixtures("float64_seeded")


def _exact_ghost(model, x, y, xv, yv, names, kwargs=False):
    g = brute.per_sample_grads(model, names, x, y, kwargs=kwargs)
    gv = brute.per_sample_grads(model, names, xv, yv, kwargs=kwargs)
    return g @ gv.sum(0)


def test_equals_exact_ghost_on_an_mlp():
    model = MLP()
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    xv, yv = torch.randn(4, 12), torch.randint(0, 5, (4,))
    names = [n for n, _ in model.named_parameters()]
    ref = _exact_ghost(model, x, y, xv, yv, names)
    got = value(model, (x, y), (xv, yv), method="ghost_flat")
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(value(model, (x, y), (xv, yv), method="ghost"), ref, rtol=1e-9)


def test_convolutions_get_the_flattened_product_not_ghost():
    model = CNN().eval()
    x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))
    xv, yv = torch.randn(3, 3, 8, 8), torch.randint(0, 4, (3,))
    got = value(model, (x, y), (xv, yv), method="ghost_flat")
    # by hand: per layer (flattened input . input' + bias) * (flattened out-grad . out-grad')
    def signals(inp, lab):
        acts, outs = {}, {}

        def keep(k):
            def hook(mod, a, o):
                acts[k], outs[k] = a[0], o
            return hook

        hooks = [m.register_forward_hook(keep(k)) for k, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv2d))]
        loss = nn.functional.cross_entropy(model(inp), lab, reduction="sum")
        for h in hooks:
            h.remove()
        keys = list(outs)
        grads = torch.autograd.grad(loss, [outs[k] for k in keys])
        return {k: (acts[k].reshape(len(lab), -1).detach(), g.reshape(len(lab), -1))
                for k, g in zip(keys, grads)}
    s, sv = signals(x, y), signals(xv, yv)
    ref = torch.zeros(5, dtype=torch.float64)
    for k, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            (a, g), (av, gv) = s[k], sv[k]
            bias = 1.0 if m.bias is not None else 0.0
            ref += ((a @ av.T + bias) * (g @ gv.T)).sum(1)
    assert torch.allclose(got, ref, rtol=1e-9)
    exact = value(model, (x, y), (xv, yv), method="ghost")
    assert (got - exact).norm() / exact.norm() > 0.05  # not the per-sample inner product


def test_token_sequences_differ_from_exact_ghost():
    model = PaddedTransformer()
    tr = token_batch(6, 7, 30, 3, seed=1)
    va = token_batch(4, 7, 30, 3, seed=2)
    flat = value(model, tr, va, method="ghost_flat")
    exact = value(model, tr, va, method="ghost")
    assert flat.shape == (6,) and torch.isfinite(flat).all()
    assert (flat - exact).norm() / exact.norm() > 0.05


def test_parameters_and_buffers_untouched_and_clear_errors():
    model = CNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    value(model, (x, y), (x, y), method="ghost_flat")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="takes no options"):
        value(model, (x, y), (x, y), method="ghost_flat", damping=0.1)
    frozen = MLP()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable nn.Linear"):
        value(frozen, (torch.randn(2, 12), torch.tensor([0, 1])),
              (torch.randn(2, 12), torch.tensor([0, 1])), method="ghost_flat")
