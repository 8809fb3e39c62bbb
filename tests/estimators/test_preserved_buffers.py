"""preserved_buffers: a scoring forward leaves every buffer as it was, and computes what a
plain train-mode forward computes (BatchNorm updates are switched off, not undone)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from lai.estimators.capture import preserved_buffers
from tests.estimators.nets import CNN


class Counting(nn.Module):
    """A module that changes a buffer of its own in forward (not a BatchNorm)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.inner(x)


def test_train_mode_forward_is_unchanged_and_leaves_no_trace():
    model = Counting(CNN()).train()
    model(torch.randn(8, 3, 10, 10))  # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, 10, 10)
    with torch.no_grad():
        expected = twin(x)
        with preserved_buffers(model):
            got = model(x)
    assert torch.equal(got, expected)  # batch statistics, bit for bit
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_restored_after_an_exception_and_in_eval_mode():
    model = CNN().train()
    model(torch.randn(8, 3, 10, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with preserved_buffers(model):
            model(torch.randn(4, 3, 10, 10))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model.eval()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
        with preserved_buffers(model):
            assert torch.equal(model(x), expected)  # eval mode reads the running statistics


def test_snapshot_reuses_copies_of_unchanged_buffers_and_restores_changed_ones():
    from lai.estimators.capture import BufferSnapshot

    model = Counting(CNN()).train()
    model.register_buffer("mask", torch.ones(5, 5, dtype=torch.bool))  # never written
    model(torch.randn(8, 3, 10, 10))
    snap = BufferSnapshot()
    copies = []
    for step in range(3):
        if step == 2:
            model.calls.fill_(7.0)  # changed between scoring forwards: a new copy is taken
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad(), preserved_buffers(model, snap):
            model(torch.randn(4, 3, 10, 10))
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (step, k)
        copies.append({id(b): id(c) for b, c, _ in snap._entries.values()})
    mask, calls = id(model.mask), id(model.calls)
    assert copies[0][mask] == copies[1][mask] == copies[2][mask]  # copied once
    assert copies[0][calls] == copies[1][calls]  # restored from the same copy
    assert copies[2][calls] != copies[1][calls]  # re-copied after the outside change
    assert float(model.calls) == 7.0
