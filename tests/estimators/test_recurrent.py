"""Recurrent models (LSTM/GRU/RNN): Ghost and the static IP exact against per-sample reverse
mode, in float32 too, where oneDNN's RNN kernel has no forward-mode formula."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lai import pairwise, value
from tests.estimators import brute


class Recurrent(nn.Module):
    def __init__(self, cell: type):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = cell(6, 7, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_ghost_exact_on_recurrent_models(cell, dtype):
    torch.manual_seed(0)
    model = Recurrent(cell).to(dtype)
    x, y = torch.randint(0, 20, (5, 4)), torch.randint(0, 3, (5,))
    xv, yv = torch.randint(0, 20, (3, 4)), torch.randint(0, 3, (3,))
    names = [n for n, _ in model.named_parameters()]
    ref = brute.per_sample_grads_autograd(model, names, x, y) @ \
        brute.per_sample_grads_autograd(model, names, xv, yv).sum(0)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*oneDNN.*")  # none leaks to the user
        for method in ("ghost", "ip"):
            got = value(model, (x, y), (xv, yv), method=method)
            assert float((got - ref).norm() / ref.norm()) < tol, method
    rows = pairwise(model, (x, y), (xv, yv), method="ghost")
    assert torch.allclose(rows.sum(1), ref, rtol=tol * 10, atol=1e-6)
    assert torch.backends.mkldnn.enabled  # restored
