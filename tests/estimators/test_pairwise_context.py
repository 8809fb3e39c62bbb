"""pairwise(..., "ghost") in train mode: each validation gradient is taken in the validation
batch's forward and every column sees the same training forward, so rows sum to value()."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import pairwise, value
from tests.estimators.nets import CNN

pytestmark = pytest.mark.usefixtures("float64_seeded")


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("case", ["batchnorm_train", "dropout_train", "batchnorm_eval"])
def test_rows_sum_to_value_in_train_mode(case):
    if case.startswith("batchnorm"):
        model = CNN().train(case == "batchnorm_train")
        xt, xv = torch.randn(5, 3, 8, 8), torch.randn(4, 3, 8, 8)
        yt, yv = torch.randint(0, 4, (5,)), torch.randint(0, 4, (4,))
    else:
        model = DropoutMLP().train()
        xt, xv = torch.randn(5, 6), torch.randn(4, 6)
        yt, yv = torch.randint(0, 3, (5,)), torch.randint(0, 3, (4,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    v = value(model, (xt, yt), (xv, yv), method="ghost")
    after_value = torch.get_rng_state()
    torch.manual_seed(7)
    rows = pairwise(model, (xt, yt), (xv, yv), method="ghost")
    assert rows.shape == (5, 4)
    assert torch.allclose(rows.sum(1), v, rtol=1e-9, atol=1e-12)
    assert torch.equal(torch.get_rng_state(), after_value)
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    # a single validation sample in train-mode BatchNorm no longer fails
    pairwise(model, (xt, yt), (xv[:2], yv[:2]), method="ghost")
