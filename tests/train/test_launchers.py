"""Sweep launchers: conf/hydra/launcher/local.yaml (joblib) and slurm.yaml (submitit)."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF
from tests.train.test_runs import _run_py, run_dirs


def test_slurm_launcher_composes_without_a_cluster():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                                           "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.partition) == (4, "gpu")
    for key in ("cpus_per_task", "mem_gb", "timeout_min"):
        assert launcher[key] > 0


def test_local_parallel_sweep_writes_four_run_folders(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = tmp_path / "runs"
    p = _run_py("--multirun", "hydra/launcher=local", "estimator=vanilla,lai", "dataset=digits_n",
                "seed=0,1", "trainer.epochs=1", "trainer.progress=false", f"results_dir={out}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    dirs = run_dirs(out)
    assert len(dirs) == 4
    got = {(s["estimator"], s["seed"]) for s in
           (json.loads((d / "summary.json").read_text()) for d in dirs)}
    assert got == {(e, s) for e in ("vanilla", "lai") for s in (0, 1)}
