"""Shared fixtures: the local data folder (skip when absent) and config composition."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Callable

# no test may touch the network: make Hugging Face fail fast instead of retrying for ~20 s
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lai.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_data_dir() -> Path | None:
    """``$LAI_DATA`` if set and present, else ``../shared/data`` beside the checkout."""
    for cand in (os.environ.get("LAI_DATA"), ROOT.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand).resolve()
    return None


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("local data not found: set LAI_DATA or place it at ../shared/data")
    return path


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture
def float64_seeded():
    """float64 default dtype and seed 0 for the test, then the old dtype back: the exactness
    tests compare against brute force at 1e-6 and need the headroom."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def tiny_overrides(tmp_path) -> list[str]:
    """Overrides that keep an end-to-end run to seconds and write into tmp_path."""
    return [f"results_dir={tmp_path / 'runs'}", "trainer.progress=false", "device=cpu"]


def crash_in_epoch(monkeypatch, epoch: int = 1, after: int = 3) -> Callable[[], None]:
    """Make ``Trainer.train_step`` raise ``RuntimeError("injected crash")`` at the ``after``-th
    step of ``epoch`` (0-based); returns a function that puts the real step back."""
    import lai.train.loop as loop_mod

    orig, calls = loop_mod.Trainer.train_step, []

    def step(self, raw, ep, i):
        if ep == epoch and len(calls) == after:
            raise RuntimeError("injected crash")
        if ep == epoch:
            calls.append(i)
        return orig(self, raw, ep, i)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", step)
    return lambda: monkeypatch.setattr(loop_mod.Trainer, "train_step", orig)
