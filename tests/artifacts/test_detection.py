"""The detection figure: runs split by what they vary, drawn from their records."""
from __future__ import annotations

import json

from omegaconf import OmegaConf

from lai.artifacts.detection import load_detection_runs, panels, plot_detection


def _run(root, name, est, policy="score_only", start=0, val_max=100, refresh=1, hidden=128,
         auc=(0.6, 0.7)):
    d = root / "digits_n" / est / name
    d.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({
        "dataset": {"name": "digits_n"}, "model": {"name": "mlp", "hidden": hidden},
        "estimator": {"name": est, "val_max": val_max, "refresh_every": refresh},
        "policy": {"name": policy, "start_epoch": start}}), d / "config.yaml")
    (d / "summary.json").write_text(json.dumps({
        "status": "completed", "n_params": hidden * 100, "final_test_acc": 0.8,
        "history": [{"epoch": e, "noisy_auc": a} for e, a in enumerate(auc)]}))


def test_runs_are_split_by_factor_and_drawn(tmp_path):
    for est in ("lai", "lli", "ghost"):
        _run(tmp_path, f"{est}-base", est)
        for v in (10, 100, 700):
            _run(tmp_path, f"{est}-v{v}", est, val_max=v, refresh=10)
        _run(tmp_path, f"{est}-never", est, refresh=100_000)
        _run(tmp_path, f"{est}-h16", est, hidden=16)
    _run(tmp_path, "lai-curated", "lai", policy="threshold", start=1, auc=(None, 0.8))
    runs = load_detection_runs(tmp_path)
    assert len(runs) == 19
    p = panels(runs)
    assert len(p["epoch"]) == 3 and len(p["curated"]) == 1
    assert sorted(p["val_max"]["val_max"].unique()) == [10, 100, 700]
    assert sorted(p["refresh_every"]["refresh_every"].unique()) == [1, 10, 100_000]
    assert set(p["model"]["model"]) == {"mlp(hidden=128)", "mlp(hidden=16)"}
    paths = plot_detection(runs, tmp_path / "fig" / "detection", "test")
    assert all(x.stat().st_size > 1000 for x in paths)
