"""Per-epoch training loss of the noisy-label and clean samples (the memorisation record)."""
from __future__ import annotations

import numpy as np
import pytest

from lai.train.runner import run_experiment
from tests.conftest import compose_cfg


def test_noisy_and_clean_losses_split_the_training_loss(tiny_overrides):
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=vanilla", "trainer.epochs=2",
                                   *tiny_overrides))
    noise = s["train_noise_rate"]
    assert 0 < noise < 1
    for row in s["history"]:
        noisy, clean = row["train_loss_noisy"], row["train_loss_clean"]
        n_noisy = round(noise * row["seen"])
        mixed = (noisy * n_noisy + clean * (row["seen"] - n_noisy)) / row["seen"]
        assert mixed == pytest.approx(row["train_loss"], rel=1e-9)
    # digits are learnt quickly: the noisy labels' loss stays above the clean ones'
    assert s["history"][-1]["train_loss_noisy"] > s["history"][-1]["train_loss_clean"]


def test_no_noise_record_without_known_noise(tiny_overrides):
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=vanilla", "trainer.epochs=1",
                                   "dataset.noise_rate=0", *tiny_overrides))
    row = s["history"][0]
    assert row.get("train_loss_noisy") is None and np.isfinite(row["train_loss_clean"])


def test_a_curation_that_keeps_one_class_is_reported(tiny_overrides, monkeypatch, capsys):
    """Kept set = one class for a whole epoch: the epoch record, the summary, a "collapse"
    record line and the console say so."""
    import json
    from pathlib import Path


    import lai.train.loop as loop_mod
    from lai.policies.threshold import ThresholdPolicy

    labels = {}
    orig_step = loop_mod.Trainer.train_step

    def step(self, raw, epoch, step_i):
        labels["now"] = raw.labels
        return orig_step(self, raw, epoch, step_i)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", step)
    monkeypatch.setattr(ThresholdPolicy, "weights",
                        lambda self, v, s, e: (labels["now"] == 3).float().to(v.device))
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=lli", "trainer.epochs=2",
                                   "policy.start_epoch=1", *tiny_overrides))
    assert "kept_classes" not in s["history"][0]  # warm-up: nothing curated
    assert s["history"][1]["kept_classes"] == 1 and s["history"][1]["collapsed"]
    assert s["collapsed_epochs"] == [1]
    lines = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text()
             .splitlines()]
    assert [x for x in lines if x["kind"] == "collapse"][0]["kept"] == "class 3 only"
    assert "curation collapsed in epoch 1" in capsys.readouterr().out
    healthy = run_experiment(compose_cfg("dataset=digits_n", "estimator=lli", "trainer.epochs=1",
                                         "policy=percentile", *tiny_overrides))
    assert healthy["history"][0]["kept_classes"] == 10 and "collapsed_epochs" not in healthy


def test_detection_metrics_by_hand():
    from lai.train.noisy import detection_metrics

    values = np.array([3.0, 2.0, 1.0, 0.0, np.nan, 1.0])
    kept = np.array([1, 1, 0, 0, -1, 1], dtype=np.int8)
    noisy = np.array([False, False, True, True, True, False])
    m = detection_metrics(values, kept, noisy)
    # scored: clean values 3, 2, 1 and noisy 1, 0. Of the 6 (noisy, clean) pairs, -value
    # ranks the noisy one higher in 5 and ties in 1 (1 vs 1): AUC = 5.5 / 6
    assert m["noisy_auc"] == pytest.approx(5.5 / 6)
    assert m["drop_precision"] == 1.0 and m["drop_recall"] == 1.0
    assert m["drop_rate_clean"] == 0.0
