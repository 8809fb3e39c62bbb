"""Ghost's probe form inside the trainer: ``policy=score_only`` runs it (values read after
the backward), and its values equal forward mode's along the identical trajectory."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

def _scores(run_dir: Path) -> np.ndarray:
    """``[epochs, n_train]`` saved values."""
    return np.stack([np.load(f)["values"] for f in sorted(run_dir.glob("scores/epoch_*.npz"))])


def test_trainer_score_only_uses_the_probe_form_with_forward_mode_values(tiny_overrides,
                                                                        monkeypatch):
    """policy=score_only: every sample trains with weight 1, so the probe form's values
    (read after the backward, rescaled by the loss coefficient 1/B) must equal forward mode's
    along the identical trajectory."""
    from lai.estimators import ghost_probe
    from lai.train.runner import run_experiment
    from tests.conftest import compose_cfg

    used = []
    orig = ghost_probe.probe_capture
    monkeypatch.setattr(ghost_probe, "probe_capture",
                        lambda *a, **k: used.append(1) or orig(*a, **k))
    summaries = {}
    for mode in ("auto", "forward"):
        cfg = compose_cfg("dataset=digits_n", "estimator=ghost", "policy=score_only",
                          f"estimator.ghost_mode={mode}", "trainer.epochs=2",
                          "save_scores=true", *tiny_overrides)
        n_before = len(used)
        summaries[mode] = run_experiment(cfg)
        assert (len(used) > n_before) == (mode == "auto")
    a, f = summaries["auto"], summaries["forward"]
    assert a["kept_fraction"] == f["kept_fraction"] == 1.0
    assert abs(a["final_test_loss"] - f["final_test_loss"]) < 1e-6
    va, vf = _scores(Path(a["run_dir"])), _scores(Path(f["run_dir"]))
    assert va.shape == vf.shape and np.isfinite(va).all()
    np.testing.assert_allclose(va, vf, rtol=1e-4, atol=1e-6 * np.abs(vf).max())


def test_probe_mode_with_a_filtering_policy_is_a_config_error(tiny_overrides):
    from lai.config import ConfigError, validate
    from tests.conftest import compose_cfg

    cfg = compose_cfg("dataset=digits_n", "estimator=ghost", "estimator.ghost_mode=probe",
                      "policy=threshold", *tiny_overrides)
    with pytest.raises(ConfigError, match="ghost_mode=probe"):
        validate(cfg)
    validate(compose_cfg("dataset=digits_n", "estimator=ghost", "estimator.ghost_mode=probe",
                         "policy=score_only", *tiny_overrides))
