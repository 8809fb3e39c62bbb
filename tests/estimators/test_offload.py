"""LAI/LLI with the validation cache offloaded to host memory (``offload=True``): the same
values, bit for bit, on every cache path (flat, folded, pairwise, per-token, deferred,
channels-last), and the prefetch bookkeeping: each entry copied once per step in the learnt
order, never more than ``lookahead + 1`` copies held. On the CPU the copies are made on the
spot; the CUDA stream path is checked in ``tests/estimators/test_gpu.py``."""
from __future__ import annotations

import pytest
import torch

from lai.batching import as_batch, forward_logits
from lai.estimators.online.lai import LAIEstimator
from lai.estimators.online.offload import HostCache
from tests.estimators.nets import CNN, PaddedTransformer, lm_batch, tiny_lm, token_batch


def _scores(est: LAIEstimator, model, train, steps: int = 3) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            with est.capture(model, train) as cap:
                forward_logits(model, train.inputs)
            out.append(est.score(cap))
    return out


def _cnn_batches(channels_last: bool):
    g = torch.Generator().manual_seed(0)
    xt, xv = torch.randn(6, 3, 10, 10, generator=g), torch.randn(5, 3, 10, 10, generator=g)
    if channels_last:
        xt, xv = (x.contiguous(memory_format=torch.channels_last) for x in (xt, xv))
    return (as_batch((xt, torch.randint(0, 4, (6,), generator=g))),
            as_batch((xv, torch.randint(0, 4, (5,), generator=g))))


CASES = {
    "cnn flat, folded": lambda: (CNN().eval(), *_cnn_batches(False), "all", "folded"),
    "cnn flat, pairwise": lambda: (CNN().eval(), *_cnn_batches(False), "all", "pairwise"),
    "cnn channels-last": lambda: (CNN().eval().to(memory_format=torch.channels_last),
                                  *_cnn_batches(True), "all", "folded"),
    "transformer classifier, folded": lambda: (
        PaddedTransformer().eval(), as_batch(token_batch(6, 9, 30, 3, 1)),
        as_batch(token_batch(5, 12, 30, 3, 2)), "all", "folded"),
    "lm tokens, pairwise": lambda: (tiny_lm(), as_batch(lm_batch(4, 8, 40, 1)),
                                    as_batch(lm_batch(3, 8, 40, 2)), "all", "pairwise"),
    "lm tokens, folded (q/k/v share)": lambda: (tiny_lm(), as_batch(lm_batch(4, 8, 40, 1)),
                                                as_batch(lm_batch(3, 8, 40, 2)), "all",
                                                "folded"),
    "lli lm, deferred": lambda: (tiny_lm(400), as_batch(lm_batch(4, 8, 400, 1)),
                                 as_batch(lm_batch(3, 8, 400, 2)), "lli", "folded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_offloaded_cache_gives_the_same_values(case):
    torch.manual_seed(0)
    model, train, val, layers, cache = CASES[case]()
    ref_est = LAIEstimator(layers=layers, cache=cache)
    off_est = LAIEstimator(layers=layers, cache=cache, offload=True, lookahead=1)
    with torch.no_grad():
        ref_est.refresh(model, val)
        off_est.refresh(model, val)
    if case == "lli lm, deferred":
        assert off_est._defer_tokens
    ref = _scores(ref_est, model, train)
    out = _scores(off_est, model, train)
    for r, o in zip(ref, out):
        assert torch.equal(r, o), case
    assert off_est.cache_bytes() == ref_est.cache_bytes()
    host = off_est._host
    reads = len(host._order)
    assert reads > 0
    # one copy per read on each step (the first step copies on demand, the others prefetch)
    assert host.copies == 3 * reads
    assert host.peak_inflight <= off_est.lookahead + 1
    for t in list(off_est.M.values()) + list(off_est.phi_v.values()):
        assert t.device.type == "cpu"


@pytest.mark.parametrize("setup", ["lm tokens", "classifier flat"])
def test_an_entry_read_by_several_layers_is_read_once_per_step(setup):
    """q/k/v read one cache entry, per token (an LM) or flattened (a sequence classifier):
    each distinct entry is fetched once per step, its term computed once and added for
    each layer (the values stay exact: test_lai_exact, test_lai_sequences)."""
    if setup == "lm tokens":
        model, train, val = tiny_lm(), lm_batch(4, 8, 40, 1), lm_batch(3, 8, 40, 2)
    else:
        model = PaddedTransformer().eval()
        train, val = token_batch(6, 9, 30, 3, 1), token_batch(5, 12, 30, 3, 2)
    est = LAIEstimator(cache="folded", offload=True)
    with torch.no_grad():
        est.refresh(model, as_batch(val))
    n_entries = len({id(t) for t in est.M.values()})
    assert n_entries < len(est.M)  # q/k/v share
    _scores(est, model, as_batch(train), steps=2)
    assert len(est._host._order) == n_entries


def test_refresh_relearns_the_order_and_keeps_shared_entries_shared():
    """q/k/v read one cache entry: offloaded, it is still one host tensor; a refresh drops
    the copies in flight and learns the order again."""
    model = tiny_lm()
    train, val = as_batch(lm_batch(4, 8, 40, 1)), as_batch(lm_batch(3, 8, 40, 2))
    est = LAIEstimator(cache="folded", offload=True)
    with torch.no_grad():
        est.refresh(model, val)
    n_entries = len({id(t) for t in est.M.values()})
    assert n_entries < len(est.M)  # q/k/v share
    _scores(est, model, train, steps=2)
    assert len(est._host._order) == n_entries  # each distinct entry read once per step
    before = dict(est.M)
    with torch.no_grad():
        for p in model.parameters():  # a training step's worth of change
            p.add_(torch.randn_like(p) * 0.01)
        est.refresh(model, val)
    assert est._host._order == [] and est._host._inflight == {}
    assert len({id(t) for t in est.M.values()}) == n_entries
    # the host buffers are reused (pinned memory is costly to allocate), with the new values
    assert all(est.M[k] is before[k] for k in est.M)
    ref = LAIEstimator(cache="folded")
    with torch.no_grad():
        ref.refresh(model, val)
    assert all(torch.equal(est.M[k], ref.M[k]) for k in est.M)
    assert torch.equal(_scores(est, model, train, 1)[0], _scores(ref, model, train, 1)[0])


def test_host_cache_serves_reads_off_the_learnt_order():
    host = HostCache(torch.device("cpu"), lookahead=2)
    a, b, c = (torch.full((3,), float(i)) for i in range(3))
    host.begin_step()
    assert [float(host.fetch(t)[0]) for t in (a, b, c)] == [0.0, 1.0, 2.0]
    host.begin_step()  # prefetches a and b
    assert host.peak_inflight == 2
    assert float(host.fetch(c)[0]) == 2.0  # out of order: served on demand
    assert float(host.fetch(a)[0]) == 0.0
    assert host.peak_inflight <= 3
    with pytest.raises(ValueError, match="lookahead"):
        HostCache(torch.device("cpu"), lookahead=-1)


def test_offload_is_refused_for_other_estimators():
    from lai.config import validate
    from lai.estimators.registry import build_estimator
    from tests.conftest import compose_cfg

    with pytest.raises(TypeError, match="estimator 'ghost' has no option.s. offload"):
        build_estimator("ghost", offload=True)
    assert isinstance(build_estimator("lli", offload=True), LAIEstimator)
    with pytest.raises(Exception, match="Could not override 'estimator.offload'"):
        compose_cfg("estimator=ghost", "estimator.offload=true")
    validate(compose_cfg("estimator=lai", "estimator.offload=true"))
