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
