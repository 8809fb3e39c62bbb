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
    from lai.estimators.online import ghost_probe
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


def test_probe_mode_with_a_filtering_policy_is_a_config_error(tiny_overrides, tmp_path):
    from lai.config import ConfigError
    from lai.train.runner import run_experiment
    from tests.conftest import compose_cfg

    for extra in (("policy=threshold",), ("policy=score_only", "trainer.strategy=two_pass")):
        cfg = compose_cfg("dataset=digits_n", "estimator=ghost", "estimator.ghost_mode=probe",
                          *extra, *tiny_overrides, f"results_dir={tmp_path}")
        with pytest.raises(ConfigError, match="ghost_mode=probe gives values only after"):
            run_experiment(cfg)
    assert not any(tmp_path.iterdir())  # refused before any run folder was made


def test_bf16_probe_form_follows_fp32(tiny_overrides):
    """Under bf16 autocast the probes run in bf16 (the output gradients arrive in bf16), the
    sum-rule check uses its bf16 tolerance, and the values stay close to fp32's."""
    from lai.train.runner import run_experiment
    from tests.conftest import compose_cfg

    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = run_experiment(compose_cfg(
            "dataset=digits_n", "estimator=ghost", "policy=score_only", "trainer.epochs=1",
            f"trainer.precision={precision}", "save_scores=true", *tiny_overrides))
    v32, v16 = (_scores(Path(runs[p]["run_dir"]))[0] for p in ("fp32", "bf16"))
    assert np.isfinite(v16).all() and runs["bf16"]["status"] == "completed"
    assert np.corrcoef(v32, v16)[0, 1] > 0.95
    assert 0.9 < np.linalg.norm(v16) / np.linalg.norm(v32) < 1.1  # the same scale (1/c_j)
