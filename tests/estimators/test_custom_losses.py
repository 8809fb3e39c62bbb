"""Any per-sample loss: Ghost, IP and LLI against brute force with the same loss (float64),
its output gradient by autograd; the Curator's loss and values with it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import Curator, value
from lai.batching import per_sample_loss, using_loss
from tests.estimators import brute
from tests.estimators.brute import rel_err
from tests.estimators.nets import MLP

pytestmark = pytest.mark.usefixtures("float64_seeded")


def mse(out, y):
    return ((out.squeeze(-1) - y) ** 2)


def smoothed_ce(logits, y):
    return nn.functional.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")


def multilabel_bce(logits, y):
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1)


CASES = {
    "mse_regression": (lambda: MLP(classes=1), lambda n, g: torch.randn(n, generator=g), mse),
    "label_smoothing": (lambda: MLP(), lambda n, g: torch.randint(0, 5, (n,), generator=g),
                        smoothed_ce),
    "multilabel_bce": (lambda: MLP(), lambda n, g: (torch.rand(n, 5, generator=g) > 0.5)
                       .double(), multilabel_bce),
}


def grads(model, names, x, y, loss_fn):
    params = [p for n, p in model.named_parameters() if n in names]
    rows = []
    for i in range(len(x)):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("case", sorted(CASES))
def test_estimators_equal_brute_force_with_any_loss(case):
    make, labels, loss_fn = CASES[case]
    model = make()
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(6, 12, generator=g), torch.randn(4, 12, generator=g)
    y, yv = labels(6, g), labels(4, g)
    names = [n for n, _ in model.named_parameters()]
    ref = grads(model, names, x, y, loss_fn) @ grads(model, names, xv, yv, loss_fn).sum(0)
    for method in ("ghost", "ip"):
        got = value(model, (x, y), (xv, yv), method=method, loss_fn=loss_fn)
        assert rel_err(got, ref) < 1e-9, method
    head = ["head.weight"]
    lli_ref = grads(model, head, x, y, loss_fn) @ grads(model, head, xv, yv, loss_fn).sum(0)
    for cache in ("folded", "pairwise"):
        got = value(model, (x, y), (xv, yv), method="lli", cache=cache, loss_fn=loss_fn)
        assert rel_err(got, lli_ref) < 1e-9, cache
    # the default loss is back outside the call
    assert per_sample_loss(torch.randn(2, 3), torch.tensor([0, 1])).shape == (2,)


def test_a_loss_that_is_not_per_sample_is_refused():
    model = MLP(classes=1)
    x, y = torch.randn(4, 12), torch.randn(4)
    with pytest.raises(ValueError, match=r"must return \[B\]"):
        value(model, (x, y), (x, y), method="ghost", loss_fn=lambda o, t: ((o - t) ** 2).mean())


def test_curator_trains_with_the_custom_loss():
    model = MLP(classes=1)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, generator=g)
    curator = Curator(model, (x[:8], y[:8]), "ghost", "threshold", val_fraction=1.0,
                      loss_fn=mse)
    with curator.step((x[8:], y[8:])) as step:
        out = model(x[8:])
    loss = step.loss(out)
    w = step.weights
    assert torch.allclose(loss, (w * mse(out, y[8:])).sum() / w.sum())
    assert rel_err(step.values, value(model, (x[8:], y[8:]), (x[:8], y[:8]), method="ghost",
                                      loss_fn=mse)) < 1e-9
    with using_loss(mse):
        assert per_sample_loss(out, y[8:]).shape == (8,)
