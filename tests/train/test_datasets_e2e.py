"""A tiny end-to-end run of every dataset whose data is in the local data folder.

Datasets whose files are absent there (CIFAR-100 images, QNLI train) must stop before
training with an error that names the files.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lai.errors import MissingDataError
from lai.train.runner import run_experiment
from tests.conftest import compose_cfg
from tests.train.test_runs import _run_py

SMALL = ["trainer.epochs=1", "dataset.train_limit=48", "dataset.val_limit=24",
         "dataset.test_limit=32", "trainer.batch_size=16", "trainer.eval_batch_size=64",
         "dataset.download=false"]
CASES = {
    # dataset: (model override, estimator)
    "cifar10n_aggre": ("model=resnet18", "lai"),
    "cifar10n_random1": ("model=resnet18_cifar", "lli"),
    "cifar10n_worst": ("model=resnet18", "lai"),
    "news20_n": ("model=bert", "lai"),
    "emotion_n": ("model=bert", "lli"),
    "glue_sst2": ("model=gpt_neo", "lai"),
    "glue_mrpc": ("model=gpt_neo", "lli"),
    "glue_rte": ("model=tiny_transformer", "lai"),
    "pile": ("model=gpt_neo", "lai"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tiny_run(name, data_dir, tiny_overrides):
    model, est = CASES[name]
    extra = ["dataset.max_length=48", "dataset.block_size=24"] if name not in (
        "cifar10n_aggre", "cifar10n_random1", "cifar10n_worst") else []
    cfg = compose_cfg(f"dataset={name}", model, f"estimator={est}", f"data_dir={data_dir}",
                      "estimator.val_fraction=0.5", *SMALL, *extra, *tiny_overrides)
    s = run_experiment(cfg)
    summary = json.loads((Path(s["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["n_train"] == 48 and summary["samples_per_epoch"][0] <= 48
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    if name == "pile":
        assert summary["final_test_ppl"] > 1.0
    else:
        assert 0 < summary["samples_per_epoch"][0]


@pytest.mark.parametrize("name,missing", [("cifar100n", "cifar-100"),
                                          ("glue_qnli", "glue/qnli/train.jsonl.gz")])
def test_missing_data_names_the_files(name, missing, data_dir, tiny_overrides, tmp_path):
    model = "model=resnet18" if name == "cifar100n" else "model=gpt_neo"
    cfg = compose_cfg(f"dataset={name}", model, f"data_dir={data_dir}", *SMALL, *tiny_overrides)
    with pytest.raises(MissingDataError, match=missing):
        run_experiment(cfg)
    assert not (tmp_path / "runs").exists()  # nothing was started
    p = _run_py(f"dataset={name}", model, f"data_dir={data_dir}", "dataset.download=false",
                f"results_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert p.returncode == 2 and "error:" in p.stderr and missing in p.stderr


def test_empty_data_dir_error_mentions_how_to_point_at_data(tmp_path, tiny_overrides):
    cfg = compose_cfg("dataset=cifar10n_worst", f"data_dir={tmp_path / 'nothing'}", *SMALL,
                      *tiny_overrides)
    with pytest.raises(MissingDataError, match="LAI_DATA|data_dir"):
        run_experiment(cfg)
