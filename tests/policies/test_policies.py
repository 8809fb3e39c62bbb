"""Policies: values (positive = helps) -> [B] float32 weights."""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lai.policies import (POLICIES, MeanStdPolicy, PercentilePolicy, Policy, RandomDropPolicy,
                          ReweightPolicy, SPLPolicy, ThresholdPolicy, build_policy,
                          build_policy_from_config)

CONF = Path(__file__).resolve().parents[2] / "conf" / "policy"
ALL = [ThresholdPolicy, PercentilePolicy, MeanStdPolicy, ReweightPolicy, SPLPolicy,
       RandomDropPolicy]


def _check(w: torch.Tensor, v: torch.Tensor) -> None:
    assert w.dtype == torch.float32 and w.shape == v.shape and w.device == v.device


# ---- threshold --------------------------------------------------------------------------
def test_threshold_keeps_value_at_least_threshold():
    v = torch.tensor([-1.0, 0.0, 2.0, 0.5])
    assert ThresholdPolicy().select(v, 0, 0).tolist() == [0, 1, 1, 1]
    assert ThresholdPolicy(0.6).select(v, 0, 0).tolist() == [0, 0, 1, 0]


# ---- percentile -------------------------------------------------------------------------
@pytest.mark.parametrize("q,b", [(0.5, 10), (0.3, 10), (0.7, 10), (0.25, 7), (0.01, 5),
                                 (1.0, 9), (0.9, 3), (0.5, 1)])
def test_percentile_keeps_exactly_ceil_qb(q, b):
    v = torch.randn(b, generator=torch.Generator().manual_seed(b))
    w = PercentilePolicy(q).select(v, 0, 0)
    _check(w, v)
    n = math.ceil(round(q * b, 9))
    assert int(w.sum()) == n and set(w.tolist()) <= {0.0, 1.0}
    # the kept ones are the top n
    assert w[v.argsort(descending=True)[:n]].sum() == n


def test_percentile_ties_lower_index_first():
    v = torch.tensor([1.0, 3.0, 3.0, 1.0, 3.0, 0.0])
    assert PercentilePolicy(0.5).select(v, 0, 0).tolist() == [0, 1, 1, 0, 1, 0]
    assert PercentilePolicy(2 / 6).select(v, 0, 0).tolist() == [0, 1, 1, 0, 0, 0]
    assert PercentilePolicy(4 / 6).select(v, 0, 0).tolist() == [1, 1, 1, 0, 1, 0]
    c = torch.zeros(5)
    assert PercentilePolicy(0.4).select(c, 0, 0).tolist() == [1, 1, 0, 0, 0]


def test_percentile_q1_keeps_all():
    v = torch.tensor([-5.0, 2.0, float("-inf"), 0.0])
    assert PercentilePolicy(1.0).select(v, 0, 0).tolist() == [1, 1, 1, 1]


# ---- mean_std ---------------------------------------------------------------------------
def test_mean_std_matches_hand_computation():
    v = torch.tensor([-3.0, 0.0, 1.0, 2.0])
    # mean 0, population var (9 + 0 + 1 + 4) / 4 = 3.5, std 1.8708
    assert MeanStdPolicy(1.0).select(v, 0, 0).tolist() == [0, 1, 1, 1]  # thr -1.87
    assert MeanStdPolicy(0.0).select(v, 0, 0).tolist() == [0, 1, 1, 1]  # thr 0
    assert MeanStdPolicy(0.5).select(v, 0, 0).tolist() == [0, 1, 1, 1]  # thr -0.935
    assert MeanStdPolicy(1.7).select(v, 0, 0).tolist() == [1, 1, 1, 1]  # thr -3.18
    # population (not unbiased) std: unbiased std 2.16 would keep -3 at k=1.5 (thr -3.24)
    assert MeanStdPolicy(1.5).select(v, 0, 0).tolist() == [0, 1, 1, 1]  # thr -2.806
    v2 = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    mean, std = 4.0, math.sqrt((9 + 4 + 1 + 0 + 36) / 5)
    expected = [float(x >= mean - 0.4 * std) for x in v2.tolist()]  # thr 2.735
    assert MeanStdPolicy(0.4).select(v2, 0, 0).tolist() == expected == [0, 0, 1, 1, 1]


def test_mean_std_single_and_constant_batches_keep_all():
    assert MeanStdPolicy(1.0).select(torch.tensor([-7.0]), 0, 0).tolist() == [1]
    c = torch.full((13,), 0.1)
    assert MeanStdPolicy(0.0).select(c, 0, 0).tolist() == [1] * 13


# ---- reweight ---------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.5, 1.0, 3.0])
def test_reweight_mean_one_positive_order_preserving(t):
    v = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 1e-3 + 0.2
    w = ReweightPolicy(t).select(v, 0, 0)
    _check(w, v)
    assert torch.all(w > 0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    order = v.argsort()
    assert torch.all(w[order].diff() > 0)
    # the formula in the docstring
    ref = 64 * torch.softmax(v.double() / (t * v.double().std(correction=0) + 1e-12), 0)
    assert torch.allclose(w.double(), ref, rtol=1e-4)


def test_reweight_constant_and_single_give_ones():
    assert ReweightPolicy().select(torch.full((7,), 3.5), 0, 0).tolist() == [1.0] * 7
    assert ReweightPolicy().select(torch.tensor([-2.0]), 0, 0).tolist() == [1.0]


def test_reweight_temperature_is_scale_free():
    v = torch.tensor([0.0, 1.0, 2.0, 5.0])
    a, b = ReweightPolicy(2.0).select(v, 0, 0), ReweightPolicy(2.0).select(v * 1e-4, 0, 0)
    assert torch.allclose(a, b, rtol=1e-4)
    hot, cold = ReweightPolicy(100.0).select(v, 0, 0), ReweightPolicy(0.5).select(v, 0, 0)
    assert (hot - 1).abs().max() < (cold - 1).abs().max()


# ---- spl --------------------------------------------------------------------------------
def test_spl_lambda_from_quantile_and_keeps_loss_below():
    losses = torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0])
    p = SPLPolicy(spl_start_fraction=0.5, spl_growth=2.0)
    assert p.current_lambda is None
    w = p.select(-losses, 0, 0)
    _check(w, losses)
    assert p.current_lambda == pytest.approx(3.0)  # median of the losses
    assert w.tolist() == [0, 1, 0, 1, 0]  # loss < 3 (strict)
    p2 = SPLPolicy(spl_start_fraction=0.25)
    p2.select(-losses, 0, 0)
    assert p2.current_lambda == pytest.approx(torch.quantile(losses, 0.25).item())


def test_spl_lambda_grows_per_epoch_elapsed():
    p = SPLPolicy(spl_lambda=1.0, spl_growth=2.0, start_epoch=1)
    v = -torch.tensor([0.5, 1.5, 3.0, 9.0])
    assert p.current_lambda == 1.0
    assert p.select(v, 0, 0).tolist() == [1, 1, 1, 1]  # warm-up: lambda untouched
    assert p.select(v, 1, 1).tolist() == [1, 0, 0, 0] and p.current_lambda == 1.0
    assert p.select(v, 2, 1).tolist() == [1, 0, 0, 0] and p.current_lambda == 1.0
    assert p.select(v, 3, 2).tolist() == [1, 1, 0, 0] and p.current_lambda == 2.0
    assert p.select(v, 4, 2).tolist() == [1, 1, 0, 0] and p.current_lambda == 2.0
    assert p.select(v, 5, 4).tolist() == [1, 1, 1, 0] and p.current_lambda == 8.0  # 2 epochs
    p.reset()
    assert p.current_lambda == 1.0


def test_spl_quantile_set_once_then_grows():
    p = SPLPolicy(spl_start_fraction=1.0, spl_growth=1.5)
    p.select(-torch.tensor([1.0, 2.0]), 0, 3)
    assert p.current_lambda == pytest.approx(2.0)
    p.select(-torch.tensor([100.0, 200.0]), 1, 3)  # same epoch: no re-initialisation
    assert p.current_lambda == pytest.approx(2.0)
    w = p.select(-torch.tensor([2.9, 3.1, 0.0]), 2, 4)
    assert p.current_lambda == pytest.approx(3.0) and w.tolist() == [1, 0, 1]


def test_spl_may_keep_nothing():
    p = SPLPolicy(spl_lambda=0.1)
    assert p.select(-torch.tensor([1.0, 2.0]), 0, 0).tolist() == [0, 0]


# ---- all policies -----------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_warmup_returns_ones_and_inactive(cls):
    p = cls(start_epoch=2)
    v = torch.tensor([-3.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    for epoch in (0, 1):
        assert not p.active(epoch)
        w = p.select(v, epoch, epoch)
        assert w.dtype == torch.float32 and w.tolist() == [1.0] * 4
    assert p.active(2) and p.active(5)
    if cls is SPLPolicy:
        assert p.current_lambda is None  # warm-up changed nothing


@pytest.mark.parametrize("cls", ALL)
def test_output_contract_and_values_untouched(cls):
    v = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.3, -0.2], dtype=torch.float16)
    before = v.clone()
    w = cls().select(v, 0, 0)
    _check(w, v)
    assert torch.equal(v, before)
    assert torch.all(w >= 0)
    empty = cls().select(torch.zeros(0), 0, 0)
    assert empty.shape == (0,) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        cls().select(torch.zeros(2, 2), 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", ALL)
def test_cuda_device_kept(cls):
    v = torch.randn(32, device="cuda")
    w = cls().select(v, 0, 0)
    _check(w, v)


@pytest.mark.parametrize("cls,kwargs", [
    (PercentilePolicy, dict(keep_fraction=0.0)), (PercentilePolicy, dict(keep_fraction=1.5)),
    (PercentilePolicy, dict(keep_fraction=float("nan"))), (MeanStdPolicy, dict(k=-0.1)),
    (MeanStdPolicy, dict(k=float("inf"))), (ReweightPolicy, dict(temperature=0.0)),
    (ReweightPolicy, dict(temperature=-1.0)), (SPLPolicy, dict(spl_growth=0.9)),
    (SPLPolicy, dict(spl_start_fraction=0.0)), (SPLPolicy, dict(spl_start_fraction=1.1)),
    (SPLPolicy, dict(spl_lambda=0.0)), (SPLPolicy, dict(spl_lambda="a")),
    (ThresholdPolicy, dict(threshold=float("nan"))), (ThresholdPolicy, dict(start_epoch=-1)),
    (ReweightPolicy, dict(start_epoch=-2)),
])
def test_bad_parameters_raise(cls, kwargs):
    with pytest.raises(ValueError, match="policy.") as e:
        cls(**kwargs)
    assert "\n" not in str(e.value)


# ---- factory ----------------------------------------------------------------------------
def test_build_policy_names_and_typed_options():
    assert set(POLICIES.names()) == {"threshold", "percentile", "mean_std", "reweight", "spl",
                                     "score_only", "random"}
    p = build_policy("threshold", threshold=0.5, start_epoch=2)
    assert isinstance(p, ThresholdPolicy) and (p.threshold, p.start_epoch) == (0.5, 2)
    p = build_policy("percentile", start_epoch=1, keep_fraction=0.25)
    assert isinstance(p, PercentilePolicy) and (p.keep_fraction, p.start_epoch) == (0.25, 1)
    assert isinstance(build_policy("spl", spl_growth=1.2), SPLPolicy)
    # an option of another policy is an error, not ignored
    with pytest.raises(TypeError, match="policy 'percentile' has no option.s. threshold"):
        build_policy("percentile", threshold=0.5)
    with pytest.raises(ValueError, match="unknown policy 'nope'; known: .*threshold"):
        build_policy("nope")
    with pytest.raises(TypeError, match="keep_fracton"):
        build_policy("percentile", keep_fracton=0.3)


def test_which_policies_keep_every_sample_unweighted():
    """The trainer may read values after the backward only for these (Ghost's probe form)."""
    v = torch.tensor([-3.0, 0.5, 2.0])
    for name, kw, keeps in [("score_only", {}, True), ("threshold", {"threshold": -math.inf}, True),
                            ("threshold", {"threshold": 0.0}, False),
                            ("percentile", {"keep_fraction": 1.0}, True),
                            ("percentile", {"keep_fraction": 0.5}, False),
                            ("reweight", {}, False), ("mean_std", {}, False)]:
        p = build_policy(name, **kw)
        assert p.keeps_all_unweighted == keeps, (name, kw)
        if keeps:  # the promise holds: weight 1 everywhere, whatever the values
            assert torch.equal(p.select(v, 0, 0), torch.ones(3)), (name, kw)


def test_constructor_defaults_match_the_options_dataclasses():
    for cls in ALL:
        entry = POLICIES.get(cls.name)
        opts, p = entry.options(name=cls.name), cls()
        assert cls.params == tuple(f.name for f in fields(opts)
                                   if f.name not in ("name", "start_epoch"))
        for name in (*cls.params, "start_epoch"):
            assert getattr(p, name) == getattr(opts, name), (cls.__name__, name)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_build_policy_from_every_yaml(path):
    node = OmegaConf.load(path)
    node.pop("defaults", None)
    cfg = OmegaConf.merge(OmegaConf.structured(POLICIES.get(path.stem).options), node)
    p = build_policy_from_config(cfg)
    assert isinstance(p, Policy) and p.name == cfg.name == path.stem
    assert p.start_epoch == cfg.start_epoch
    for name in p.params:
        assert getattr(p, name) == getattr(cfg, name)
    v = torch.tensor([-1.0, 0.0, 2.0, 0.5])
    w = p.select(v, 0, cfg.start_epoch)
    _check(w, v)
    assert torch.all(w >= 0) and w.sum() > 0


def test_build_policy_from_options_and_mappings():
    from lai.policies.reweight import ReweightOptions
    from lai.policies.spl import SPLOptions

    p = build_policy_from_config(ReweightOptions(temperature=2.0, start_epoch=3))
    assert isinstance(p, ReweightPolicy) and (p.temperature, p.start_epoch) == (2.0, 3)
    p = build_policy_from_config(SPLOptions(spl_lambda=0.7, spl_growth=1.3))
    assert (p.spl_lambda, p.spl_growth, p.current_lambda) == (0.7, 1.3, 0.7)
    with pytest.raises(ValueError, match="keep_fraction"):
        build_policy_from_config({"name": "percentile", "keep_fraction": 2.0})
    with pytest.raises(ValueError, match="unknown policy"):
        build_policy_from_config({"name": "bogus"})


# ---- what the trainer may assume without reading the weights back ------------------------
@pytest.mark.parametrize("policy", [PercentilePolicy(0.3), PercentilePolicy(1.0),
                                    MeanStdPolicy(0.0), MeanStdPolicy(2.0),
                                    ReweightPolicy(0.5)])
def test_policies_that_never_drop_a_whole_batch(policy):
    assert not policy.may_drop_all
    g = torch.Generator().manual_seed(0)
    for b in (1, 2, 7, 64):
        for v in (torch.randn(b, generator=g), torch.full((b,), 3.0),
                  torch.randn(b, generator=g) * 1e6):
            w = policy.select(v, 0, 0)
            assert (w > 0).any()
            n = policy.fixed_kept(b)
            if n is not None:  # the count the trainer relies on in two_pass
                assert int((w > 0).sum()) == n


@pytest.mark.parametrize("policy", [ThresholdPolicy(), SPLPolicy(spl_lambda=0.1)])
def test_policies_that_may_drop_a_whole_batch_say_so(policy):
    assert policy.may_drop_all and policy.fixed_kept(8) is None
    assert not (policy.select(torch.full((8,), -5.0), 0, 0) > 0).any()


def test_threshold_minus_infinity_keeps_everything_without_a_count():
    p = ThresholdPolicy(-math.inf)
    assert not p.may_drop_all and p.fixed_kept(5) == 5
    assert p.select(torch.tensor([-1e30, 0.0, 3.0]), 0, 0).tolist() == [1, 1, 1]
