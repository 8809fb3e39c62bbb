"""Ghost's forward form inside a training forward (lai/estimators/forward/tangents.py): the graph it
leaves for the backward holds no record of tangent operations, the tangents of tensors nothing
can reach any more are released during the forward, and values and gradients are
bit-identical to a forward that keeps everything."""
from __future__ import annotations

import sys
from contextlib import nullcontext

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from lai.batching import Batch, as_batch, forward_logits, per_sample_loss
from lai.estimators.online import ghost
from lai.estimators.online.ghost import GhostEstimator
from lai.estimators.forward.tangents import TangentRelease
from lai.bench.memory import PeakTensorMemory
from tests.estimators.nets import lm_batch, tiny_bert_classifier, tiny_lm, token_batch


def _resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(num_classes=4)  # in-place ReLU, residual adds, BN


def _image_batch(n: int) -> Batch:
    g = torch.Generator().manual_seed(1)
    return as_batch((torch.randn(n, 3, 32, 32, generator=g),
                     torch.randint(0, 4, (n,), generator=g)))


CASES = {
    "resnet18_train_bn": (_resnet18, lambda: _image_batch(12), lambda: _image_batch(5)),
    "bert_train_dropout0": (lambda: tiny_bert_classifier(2),
                            lambda: as_batch(token_batch(6, 10, 40, 3, seed=1)),
                            lambda: as_batch(token_batch(4, 10, 40, 3, seed=2))),
    "gpt_neo_lm": (tiny_lm, lambda: as_batch(lm_batch(5, 12, 40, seed=1)),
                   lambda: as_batch(lm_batch(3, 12, 40, seed=2))),
}


def _training_step(model: nn.Module, est: GhostEstimator, batch: Batch
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One-pass training step as the trainer runs it: the forward inside the capture (under
    the estimator's ``forward_context``, e.g. bf16 autocast), the backward of the mean loss
    (bf16 logits taken in fp32) after it. Returns the values and the parameters' gradients."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        with est.capture(model, batch) as cap, est.forward_context():
            logits = forward_logits(model, batch.inputs)
        if logits.dtype == torch.bfloat16:
            logits = logits.float()
        per_sample_loss(logits, batch.labels).mean().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return est.score(cap), grads  # None: a frozen parameter


def _without_tangent_free_graph(monkeypatch) -> None:
    monkeypatch.setattr(ghost, "tangent_free_graph", lambda model, **kw: nullcontext())


@pytest.mark.parametrize("release", [True, False], ids=["release", "graph_only"])
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_are_bit_identical(case, release, monkeypatch):
    make_model, make_train, make_val = CASES[case]
    torch.manual_seed(0)
    model = make_model().train()
    for m in model.modules():  # dropout off: two forwards must see the same function
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    est = GhostEstimator(mode="forward", release_tangents=release)
    est.refresh(model, make_val())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    values, grads = _training_step(model, est, make_train())
    model.load_state_dict(state)  # BatchNorm's running statistics moved
    _without_tangent_free_graph(monkeypatch)
    ref_values, ref_grads = _training_step(model, est, make_train())
    assert torch.equal(values, ref_values)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert values.abs().sum() > 0


def _forward_excess_bytes(model: nn.Module, est: GhostEstimator | None, batch: Batch) -> int:
    """Peak live tensor bytes of a training forward (grad enabled, inside Ghost's capture
    unless ``est`` is None) above those alive at its start. The backward is left out: the
    forward's end is where a forward-mode step holds the most beyond vanilla."""
    with torch.enable_grad(), PeakTensorMemory(device="cpu") as mem:
        if est is None:
            logits = forward_logits(model, batch.inputs)
        else:
            with est.capture(model, batch):
                logits = forward_logits(model, batch.inputs)
    del logits
    return mem.peak_bytes - mem.start_bytes


def test_training_forward_memory(monkeypatch):
    """ResNet-18 in train mode (BatchNorm, in-place ReLU, residual adds), batch 32, float64,
    the forward's peak above its start as a multiple of a vanilla forward's. Measured: 1.07
    with the release and BatchNorm's lean tangent (forward_fastpaths.py); 1.53 with
    PyTorch's BatchNorm formula, which peaks in the stem BatchNorm; 1.98 with the graph
    freed only; 3.86 with everything kept (PyTorch's own behaviour). At batch 128 in fp32:
    57.5, 80, 105 and 203 MiB against vanilla's 54."""
    torch.manual_seed(0)
    model = _resnet18().train()
    batch = _image_batch(32)
    excess = {}
    for name, release, fast in (("release", True, True), ("pytorch_bn", True, False),
                                ("graph_only", False, False)):
        est = GhostEstimator(mode="forward", release_tangents=release, forward_fastpaths=fast)
        est.refresh(model, _image_batch(4))
        _forward_excess_bytes(model, est, batch)  # warm-up
        excess[name] = _forward_excess_bytes(model, est, batch)
    base = _forward_excess_bytes(model, None, batch)
    _without_tangent_free_graph(monkeypatch)
    full = _forward_excess_bytes(model, est, batch)
    assert excess["release"] <= 1.25 * base, (excess, base)
    assert excess["pytorch_bn"] >= 1.2 * excess["release"], excess
    assert excess["graph_only"] >= 1.15 * excess["pytorch_bn"], excess
    assert full >= 1.5 * excess["graph_only"], (full, excess)


def test_release_spares_reachable_tensors_and_poisons_the_rest():
    """A tracked dual tensor that Python still references keeps its tangent; once only the
    tracker (and autograd, which saved it) holds it, its tangent is released in place, reads
    NaN, and holds one element."""
    w = torch.randn(5, 5, requires_grad=True)
    with torch.enable_grad(), fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(3, 5), torch.randn(3, 5))
        h = x @ w
        y = h.sin()  # saves h for the backward
        tracker = TangentRelease()
        tracker.track((h, y))
        tracker.sweep()
        assert tracker.released == 0  # both still referenced here
        tangent_h = fwAD.unpack_dual(h).tangent
        expected_y_tangent = fwAD.unpack_dual(y).tangent.clone()
        del h
        tracker.sweep()
        assert tracker.released == 1
        assert torch.isnan(tangent_h).all() and tangent_h.untyped_storage().nbytes() == 8
        assert torch.equal(fwAD.unpack_dual(y).tangent, expected_y_tangent)
        y.sum().backward()  # the saved h still serves the backward
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("read_back", ["new_view", "direct"])
def test_reading_a_released_tangent_raises(read_back):
    """A model that reaches a tensor again through a view's ``._base`` after dropping it: a
    new view of it fails inside forward AD, a direct read gives NaN values; both raise an
    error that names ``release_tangents=false``, which makes the same model work."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 3)
            self.register_buffer("pick", torch.eye(6)[:, :3])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = self.first(x)
            view = hidden[:, :3]
            del hidden
            out = self.second(x)  # a module return: `hidden`, unreferenced, is released
            base = view._base  # ... and reached again through the view's base
            return out + (base[:, 3:] if read_back == "new_view" else base.matmul(self.pick))

    batch = as_batch((torch.randn(4, 6), torch.randint(0, 3, (4,))))
    model = Net()
    est = GhostEstimator(mode="forward")
    est.refresh(model, batch)
    with pytest.raises(RuntimeError, match="release_tangents=false") as err:
        _training_step(model, est, batch)
    assert ("not finite" in str(err.value)) == (read_back == "direct")
    est = GhostEstimator(mode="forward", release_tangents=False)
    est.refresh(model, batch)
    values, _ = _training_step(model, est, batch)
    assert torch.isfinite(values).all()


def test_bit_identical_under_bf16_autocast(monkeypatch):
    """ResNet-18 in fp32 under CPU bf16 autocast (the trainer's GPU setting): bf16 module
    outputs and tangents are detached the same way."""
    torch.manual_seed(0)
    model = _resnet18().float().train()
    est = GhostEstimator(mode="forward")
    est.forward_context = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    batch = as_batch((torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float32),
                      torch.randint(0, 4, (8,), generator=g)))
    est.refresh(model, batch)
    with torch.no_grad(), est.forward_context():
        assert model.eval()(batch.inputs).dtype == torch.bfloat16
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    values, grads = _training_step(model, est, batch)
    model.load_state_dict(state)
    _without_tangent_free_graph(monkeypatch)
    ref_values, ref_grads = _training_step(model, est, batch)
    assert torch.equal(values, ref_values)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_an_unrelated_error_keeps_its_type_and_message():
    """An error of the model's own, raised after tangents were released, is re-raised as it
    was (an out-of-memory error must stay one); on Python >= 3.11 it carries a note naming
    the switch."""

    class Boom(RuntimeError):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.second(self.first(x))
            self.second(x)  # a module return: the first layer's output is released here
            if self.fail:
                raise Boom("the model's own error")
            return out

    batch = as_batch((torch.randn(4, 6), torch.randint(0, 3, (4,))))
    model = Net()
    model.fail = False
    est = GhostEstimator(mode="forward")
    est.refresh(model, batch)
    model.fail = True
    with pytest.raises(Boom) as err:
        _training_step(model, est, batch)
    assert str(err.value) == "the model's own error"
    if sys.version_info >= (3, 11):
        assert any("release_tangents=false" in n for n in err.value.__notes__)
