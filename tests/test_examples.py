"""examples/: each script runs offline on a tiny model (a few steps here)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(
        ["plain_loop", "custom_loss_regression", "causal_lm_hf_labels", "hf_trainer"])


def test_plain_loop():
    out = load("plain_loop").main(["--steps", "3", "--batch", "16"])
    assert 0 < out["kept_fraction"] <= 1 and 0 <= out["noisy_dropped"] <= 1


def test_custom_loss_regression():
    out = load("custom_loss_regression").main(["--steps", "10"])
    assert 0 < out["kept_fraction"] <= 1 and out["val_mse"] >= 0


def test_causal_lm_hf_labels():
    out = load("causal_lm_hf_labels").main(["--steps", "3"])
    assert 0 <= out["junk_dropped"] <= 1 and out["last_loss"] > 0


def test_hf_trainer():
    pytest.importorskip("accelerate")
    out = load("hf_trainer").main(["--steps", "5"])
    assert out["kept_fractions"] and all(0 <= k <= 1 for k in out["kept_fractions"])
