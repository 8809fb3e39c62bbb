"""End-to-end runs of the online runner on digits_n (bundled with scikit-learn: always there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lai.train import loop as loop_mod
from lai.train.runner import run_experiment
from tests.conftest import ROOT, compose_cfg


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_digits_lai_records_and_targets_noisy_labels(tiny_overrides, tmp_path):
    cfg = compose_cfg("dataset=digits_n", "estimator=lai", "trainer.epochs=6",
                      "save_scores=true", *tiny_overrides)
    s = run_experiment(cfg)
    run_dir = Path(s["run_dir"])
    assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("final_test_acc", "best_test_acc", "final_val_loss", "samples_per_epoch",
                "wall_time_s", "peak_memory_mb", "kept_fraction"):
        assert summary[key] is not None, key
    assert summary["status"] == "completed"
    assert len(summary["samples_per_epoch"]) == 6
    assert 0 < summary["kept_fraction"] < 1  # LAI drops some samples, not all
    # LAI drops samples with noisy labels far more often than clean ones
    assert summary["drop_rate_noisy"] > summary["drop_rate_clean"] + 0.1
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(6))
    assert all("test_acc" in r and "val_loss" in r for r in epochs)
    scores = np.load(run_dir / "scores" / "epoch_005.npz")
    assert scores["values"].shape == (summary["n_train"],)
    assert set(np.unique(scores["kept"])) <= {0, 1}
    assert np.isfinite(scores["values"]).all()


def test_warmup_trains_on_everything_first(tiny_overrides):
    cfg = compose_cfg("dataset=digits_n", "estimator=lli", "trainer.epochs=2",
                      "policy.start_epoch=1", *tiny_overrides)
    s = run_experiment(cfg)
    assert s["samples_per_epoch"][0] == s["n_train"]
    assert s["samples_per_epoch"][1] < s["n_train"]


def test_vanilla_keeps_everything(tiny_overrides):
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=vanilla", "trainer.epochs=1",
                                   *tiny_overrides))
    assert s["samples_per_epoch"] == [s["n_train"]] and s["kept_fraction"] == 1.0


def test_refresh_every_controls_cache_rebuilds(tiny_overrides, monkeypatch):
    from lai.curate import Curator

    calls = []
    orig = Curator.refresh
    monkeypatch.setattr(Curator, "refresh",
                        lambda self, batch=None: calls.append(1) or orig(self, batch))
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", "trainer.epochs=1",
                                   "estimator.refresh_every=3", *tiny_overrides))
    assert len(calls) == -(-s["steps"] // 3)


def test_same_config_twice_is_run_once(tiny_overrides, tmp_path):
    runs = [run_experiment(compose_cfg("dataset=digits_n", "estimator=vanilla",
                                       "trainer.max_steps=2", *tiny_overrides))
            for _ in range(2)]
    assert runs[0] == runs[1]  # the second call returns the completed run's summary
    assert len(run_dirs(tmp_path / "runs")) == 1


def test_crash_leaves_a_failed_summary(tiny_overrides, tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(loop_mod.Trainer, "train_step", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", *tiny_overrides))
    (run_dir,) = run_dirs(tmp_path / "runs")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected failure" in summary["error"]


def test_seeds_reproduce(tiny_overrides):
    a = run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", "trainer.epochs=2",
                                   *tiny_overrides))
    b = run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", "trainer.epochs=2",
                                   "run_name=again", *tiny_overrides))  # its own folder
    assert a["run_dir"] != b["run_dir"]
    assert a["samples_per_epoch"] == b["samples_per_epoch"]
    assert a["final_test_acc"] == b["final_test_acc"]


def _run_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_multirun_sweep_writes_one_folder_per_job(tmp_path):
    out = tmp_path / "runs"
    p = _run_py("--multirun", "estimator=vanilla,lai,lli", "dataset=digits_n", "seed=0,1",
                "trainer.epochs=1", f"results_dir={out}", "trainer.progress=false",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    dirs = run_dirs(out)
    assert len(dirs) == 6
    seen = set()
    for d in dirs:
        s = json.loads((d / "summary.json").read_text())
        seen.add((s["estimator"], s["seed"]))
    assert seen == {(e, s) for e in ("vanilla", "lai", "lli") for s in (0, 1)}


@pytest.mark.parametrize("override,message", [
    ("trainer.bogus=1", "bogus"),
    ("estimator.val_fraction=2", "estimator.val_fraction must be in (0, 1]"),
    ("estimator=shapley", "shapley"),
    ("device=tpu", "device"),
])
def test_bad_config_fails_before_training(tmp_path, override, message):
    p = _run_py("dataset=digits_n", override, f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert p.returncode != 0
    assert message in p.stderr
    assert not (tmp_path / "runs").exists() or not run_dirs(tmp_path / "runs")


def test_eval_at_steps_and_removed_count(tiny_overrides):
    cfg = compose_cfg("dataset=digits_n", "estimator=lai", "trainer.epochs=2",
                      "trainer.eval_at_steps=[3,10]", *tiny_overrides)
    s = run_experiment(cfg)
    assert set(s["step_evals"]) == {"3", "10"}
    for ev in s["step_evals"].values():
        assert 0 <= ev["test_acc"] <= 1 and ev["val_loss"] > 0
    assert s["step_evals"]["3"]["removed_so_far"] <= s["step_evals"]["10"]["removed_so_far"]
    assert s["samples_removed"] == s["samples_seen"] - sum(s["samples_per_epoch"])
    assert [h["epoch"] for h in s["history"]] == [0, 1]
    lines = read_jsonl(Path(s["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in lines if r["kind"] == "step_eval"] == [3, 10]


def test_a_failing_job_does_not_end_a_sweep(tmp_path):
    out = tmp_path / "runs"
    # the second job's learning rate is invalid: it fails, the third still runs
    p = _run_py("--multirun", "dataset=digits_n", "trainer.lr=0.01,-1,0.02", "trainer.epochs=1",
                f"results_dir={out}", "trainer.progress=false",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "trainer.lr must be > 0" in p.stderr
    assert len(run_dirs(out)) == 2
