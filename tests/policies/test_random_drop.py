"""The random-drop control: value-free keep decisions, matched to another run's kept fraction."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lai.config import ConfigError, validate
from lai.policies import RandomDropPolicy, build_policy
from lai.policies.matching import MatchError
from lai.train.runner import method_label, run_experiment
from tests.conftest import compose_cfg, crash_in_epoch

DIGITS = ["dataset=digits_n", "trainer.epochs=3", "trainer.batch_size=64",
          "trainer.eval_every_epoch=false"]


def test_keep_rate_is_the_probability_and_ignores_values():
    p = RandomDropPolicy(keep_fraction=0.3)
    kept = torch.stack([p.select(torch.zeros(1000), step, 0) for step in range(20)])
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert kept.mean().item() == pytest.approx(0.3, abs=0.01)
    # the decisions do not depend on the values given
    v = torch.randn(1000)
    assert torch.equal(p.select(v, 7, 0), p.select(-v, 7, 0))
    assert torch.equal(p.select(v, 7, 0), RandomDropPolicy(0.3).select(v, 7, 0))  # pure in step
    assert not torch.equal(p.select(v, 7, 0), p.select(v, 8, 0))


def test_draws_are_the_values_a_threshold_would_keep():
    p = RandomDropPolicy(keep_fraction=0.6, seed=3)
    u = p.own_values(50, 11, torch.device("cpu"))
    assert u.shape == (50,) and u.dtype == torch.float32 and ((0 <= u) & (u < 1)).all()
    assert torch.equal(p.select(u, 11, 0), (u >= 0.4).float())
    assert not torch.equal(u, RandomDropPolicy(0.6, seed=4).own_values(50, 11, "cpu"))


def test_schedule_per_epoch_and_its_errors():
    p = RandomDropPolicy()
    p.set_schedule([1.0, 0.5, 0.0], source="x")
    v = torch.zeros(400)
    assert p.select(v, 0, 0).sum() == 400
    assert 150 < p.select(v, 1, 1).sum() < 250
    assert p.select(v, 2, 2).sum() == 0
    with pytest.raises(ValueError, match="no matched kept fraction for epoch 3"):
        p.select(v, 3, 3)
    with pytest.raises(ValueError, match="must be in"):
        p.set_schedule([0.5, 1.2])
    with pytest.raises(RuntimeError, match="prepare"):
        RandomDropPolicy(match="lai").select(v, 0, 0)
    with pytest.raises(ValueError, match="policy.match"):
        RandomDropPolicy(match="")


def test_folder_names():
    def label(*o):
        return method_label(compose_cfg("estimator=vanilla", *o))

    assert label("policy=random", "policy.match=lai") == "random-lai"
    assert label("policy=random", "policy.keep_fraction=0.25") == "random-p0.25"
    assert label("policy=random", "policy.match=/x/y") == "random-matched"
    assert method_label(compose_cfg("policy=random", "estimator=lai",
                                    "policy.match=lli")) == "lai-random-lli"
    assert method_label(compose_cfg("run_name=mine", "estimator=vanilla", "policy=random")) == "mine"


def test_match_on_another_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="policy 'threshold' has no option.s. match"):
        validate(compose_cfg("policy=threshold", "+policy.match=lai"))
    with pytest.raises(ConfigError, match="keep_fraction"):
        validate(compose_cfg("estimator=vanilla", "policy=random", "policy.keep_fraction=0"))


def test_control_matches_its_method_per_epoch(tiny_overrides):
    """LAI then its control, same seed: the control keeps each epoch's samples at LAI's
    kept fraction of that epoch (warm-up included), trains on the same data order and model
    init, and records chance-level detection."""
    common = [*DIGITS, "policy.start_epoch=1", *tiny_overrides]
    lai = run_experiment(compose_cfg(*common, "estimator=lai"))
    ctl = run_experiment(compose_cfg(*common, "estimator=vanilla", "policy=random", "policy.match=lai"))
    assert ctl["method"] == "random-lai" and ctl["estimator"] == "vanilla"
    assert Path(ctl["random_matched_run"]).parent == Path(lai["run_dir"])
    assert ctl["random_keep_probabilities"] == [r["kept_fraction"] for r in lai["history"]]
    assert ctl["history"][0]["kept_fraction"] == 1.0  # LAI's warm-up epoch: everything kept
    for mine, theirs in zip(ctl["history"][1:], lai["history"][1:]):
        n = mine["seen"]
        sd = (theirs["kept_fraction"] * (1 - theirs["kept_fraction"]) / n) ** 0.5
        assert abs(mine["kept_fraction"] - theirs["kept_fraction"]) < 5 * sd + 1e-9
        assert 0.3 < mine["noisy_auc"] < 0.7  # random draws as values: chance detection
    # another seed has no LAI run to match: a clear error before training
    with pytest.raises(MatchError, match="no completed run of 'lai'"):
        run_experiment(compose_cfg(*common, "estimator=vanilla", "policy=random", "policy.match=lai", "seed=5"))
    # a run folder's path works as well
    by_path = run_experiment(compose_cfg(*common, "estimator=vanilla", "policy=random",
                                         f"policy.match={lai['run_dir']}"))
    assert by_path["random_keep_probabilities"] == ctl["random_keep_probabilities"]
    assert by_path["final_test_acc"] == ctl["final_test_acc"]  # same draws, same training


def test_match_needs_the_same_trainer_and_warmup(tiny_overrides):
    run_experiment(compose_cfg(*DIGITS, "estimator=lai", *tiny_overrides))
    with pytest.raises(MatchError, match="no completed run"):
        run_experiment(compose_cfg(*DIGITS, "estimator=vanilla", "policy=random", "policy.match=lai",
                                   "trainer.lr=0.5", *tiny_overrides))
    with pytest.raises(MatchError, match="no completed run"):
        run_experiment(compose_cfg(*DIGITS, "estimator=vanilla", "policy=random", "policy.match=lai",
                                   "policy.start_epoch=1", *tiny_overrides))
    with pytest.raises(MatchError, match="no such run folder"):
        run_experiment(compose_cfg(*DIGITS, "estimator=vanilla", "policy=random", "policy.match=/nope/run",
                                   *tiny_overrides))


def test_two_matching_runs_are_ambiguous(tiny_overrides):
    run_experiment(compose_cfg(*DIGITS, "estimator=lai", *tiny_overrides))
    run_experiment(compose_cfg(*DIGITS, "estimator=lai", "estimator.val_fraction=0.5",
                               *tiny_overrides))
    with pytest.raises(MatchError, match="2 completed runs match"):
        run_experiment(compose_cfg(*DIGITS, "estimator=vanilla", "policy=random", "policy.match=lai",
                                   *tiny_overrides))


def test_crashed_control_resumes_to_the_same_run(tiny_overrides, monkeypatch):
    """Draws depend on (seed, step) only and the matched rates are re-read on resume: a
    matched control that crashed in epoch 2 resumes and ends as an uninterrupted one does."""
    common = [*DIGITS, *tiny_overrides]
    run_experiment(compose_cfg(*common, "estimator=lai"))
    ctl = [*common, "estimator=vanilla", "policy=random", "policy.match=lai", "save_scores=true"]
    ref = run_experiment(compose_cfg(*ctl, "run_name=reference"))
    restore = crash_in_epoch(monkeypatch, epoch=1, after=3)
    with pytest.raises(RuntimeError, match="injected crash"):
        run_experiment(compose_cfg(*ctl))
    restore()
    resumed = run_experiment(compose_cfg(*ctl))
    assert resumed["status"] == "completed"
    assert resumed["samples_per_epoch"] == ref["samples_per_epoch"]
    assert resumed["final_test_acc"] == ref["final_test_acc"]
    for epoch in range(3):
        a = np.load(Path(ref["run_dir"]) / "scores" / f"epoch_{epoch:03d}.npz")["kept"]
        b = np.load(Path(resumed["run_dir"]) / "scores" / f"epoch_{epoch:03d}.npz")["kept"]
        assert np.array_equal(a, b)
    fixed = run_experiment(compose_cfg(*common, "estimator=vanilla", "policy=random", "policy.keep_fraction=0.5"))
    assert fixed["random_keep_probability"] == 0.5 and fixed["method"] == "random-p0.5"
    saved = json.loads((Path(fixed["run_dir"]) / "summary.json").read_text())
    assert saved["method"] == "random-p0.5"
