"""Estimators and policies are plug-ins: a toy estimator registered from a test module (not
from ``lai``) runs through ``run.py`` and :func:`lai.value`, with its own typed options."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

import lai
from lai.estimators.registry import ESTIMATORS, OnlineOptions
from lai.plugins import Registry, load_plugins
from tests.conftest import ROOT

PLUGIN = "tests.plugins.toy_estimator"
SEARCHPATH = f"hydra.searchpath=[file://{ROOT / 'tests' / 'plugins' / 'conf'}]"
RUN = [sys.executable, str(ROOT / "run.py"), "dataset=digits_n", "trainer.epochs=1",
       "trainer.progress=false", "device=cpu"]


def _run(tmp_path, *args: str, plugins: str = PLUGIN) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "LAI_PLUGINS": plugins}
    return subprocess.run([*RUN, f"results_dir={tmp_path}", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _summary(tmp_path) -> dict:
    (path,) = tmp_path.rglob("summary.json")
    return json.loads(path.read_text())


def test_a_toy_estimator_from_a_test_module_runs_through_run_py(tmp_path):
    # without a YAML file: the options dataclass is the config (scale defaults to 1)
    out = _run(tmp_path / "a", "estimator=toy")
    assert out.returncode == 0, out.stderr[-2000:]
    s = _summary(tmp_path / "a")
    assert (s["status"], s["estimator"]) == ("completed", "toy")
    cfg = OmegaConf.load(next((tmp_path / "a").rglob("config.yaml")))
    assert cfg.estimator.scale == 1.0 and cfg.estimator.name == "toy"
    assert 0 < s["kept_fraction"] < 1  # it valued and dropped some samples

    # with its YAML on Hydra's search path (scale 2 there); scale=0 values everything 0,
    # so the threshold policy keeps every sample: the option reaches the estimator
    out = _run(tmp_path / "b", "estimator=toy", SEARCHPATH, "estimator.scale=0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert _summary(tmp_path / "b")["kept_fraction"] == 1.0
    cfg = OmegaConf.load(next((tmp_path / "b").rglob("config.yaml")))
    assert (cfg.estimator.scale, cfg.estimator.val_fraction) == (0.0, 1.0)  # YAML's value


def test_toy_options_are_checked_like_the_built_in_ones(tmp_path):
    out = _run(tmp_path, "estimator=toy", "estimator.layers=all")  # LAI's option
    assert out.returncode == 1 and "Key 'layers' not in 'ToyOptions'" in out.stderr
    out = _run(tmp_path, "estimator=toy", "estimator.scale=-1")  # its own check
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: estimator.scale must be >= 0"
    assert not any(tmp_path.rglob("summary.json"))
    out = _run(tmp_path, "estimator=toy", plugins="tests.plugins.missing_module")
    assert out.returncode != 0 and "tests.plugins.missing_module" in out.stderr


def test_the_public_api_takes_the_plug_in_and_its_values_are_right():
    load_plugins(PLUGIN)
    assert "toy" in ESTIMATORS.names("online")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    xv, yv = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    got = lai.value(model, (x, y), (xv, yv), method="toy")

    def grad_logits(inputs, labels):  # d ell / d logits, one sample at a time, by autograd
        rows = []
        for xi, yi in zip(inputs, labels):
            z = model(xi[None]).detach().requires_grad_(True)
            torch.nn.functional.cross_entropy(z, yi[None]).backward()
            rows.append(z.grad[0])
        return torch.stack(rows)

    want = grad_logits(x, y) @ grad_logits(xv, yv).sum(0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(TypeError, match="estimator 'toy' has no option.s. layers"):
        lai.value(model, (x, y), (xv, yv), method="toy", layers="all")


def test_registry_refuses_duplicates_and_non_dataclass_options_and_names_known_ones():
    reg = Registry("widget")

    @dataclass
    class Opts:
        name: str = "a"
        size: int = 1

    def build_a(o):
        return "a", o.size

    def another(o):
        return None

    reg.register("a", Opts)(build_a)
    reg.register("a", Opts)(build_a)  # the same builder again (a module imported twice)
    assert reg.build(reg.options("a", size=3)) == ("a", 3)
    with pytest.raises(ValueError, match="widget 'a' is registered already"):
        reg.register("a", Opts)(another)
    with pytest.raises(TypeError, match="options must be a dataclass"):
        reg.register("b", dict)
    with pytest.raises(ValueError, match="unknown widget 'c'; known: a"):
        reg.get("c")
    with pytest.raises(TypeError, match="widget 'a' has no option.s. colour; its options: size"):
        reg.options("a", colour="red")


def test_the_online_options_hierarchy_gives_the_curator_its_keywords():
    o = ESTIMATORS.options("lai", refresh_every=3, val_max=7)
    assert isinstance(o, OnlineOptions)
    assert o.curation() == {"val_fraction": 0.1, "val_max": 7, "refresh_every": 3,
                            "val_mode": "eval", "self_influence": False,
                            "precondition": "none"}
    assert ESTIMATORS.options("vanilla").curation() == {"val_fraction": 0.1, "val_max": None}
