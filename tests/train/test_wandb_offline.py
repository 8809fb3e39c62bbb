"""logger=wandb works offline without an account and never writes the API key anywhere."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lai.train.runner import run_experiment
from tests.conftest import compose_cfg

FAKE_KEY = "fakekey" + "0123456789abcdef" * 2 + "42"


def test_wandb_offline_run_completes_and_writes_no_key(tiny_overrides, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", "logger=wandb",
                                   "trainer.epochs=1", *tiny_overrides))
    run_dir = Path(s["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run written"
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), f"API key written to {path}"
