"""Registry, data-dir resolution, digits and the conf/dataset YAML files."""
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lai.config import DatasetConfig
from lai.data import DATASETS, MissingDataError, build_data, needs_tokenizer, resolve_data_dir

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"
NAMES = {"cifar10n_aggre", "cifar10n_random1", "cifar10n_worst", "cifar100n", "news20_n",
         "emotion_n", "glue_sst2", "glue_mrpc", "glue_qnli", "glue_rte", "pile", "digits_n"}


def test_registry_names_and_yaml_files():
    # composition of each file with the rest of the config is tested in tests/test_config.py
    assert set(DATASETS) == NAMES
    assert {p.stem for p in CONF.glob("*.yaml")} == NAMES


def test_unknown_name_and_missing_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="known: .*digits_n"):
        build_data(DatasetConfig(name="mnist"), data_dir=tmp_path, seed=0)
    with pytest.raises(ValueError, match="tokenizer"):
        build_data(DatasetConfig(name="emotion_n"), data_dir=tmp_path, seed=0)
    assert issubclass(MissingDataError, FileNotFoundError)
    assert needs_tokenizer("glue_rte") and needs_tokenizer("pile")
    assert not needs_tokenizer("digits_n") and not needs_tokenizer("cifar10n_worst")


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LAI_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "cfg")) == (tmp_path / "cfg").resolve()
    assert resolve_data_dir(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("LAI_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir(None) == (tmp_path / ".cache" / "lai").resolve()
    assert resolve_data_dir("~/x") == (tmp_path / "x").resolve()


def test_digits(tmp_path, make_cfg, check_classification):
    cfg = make_cfg("digits_n")
    b = build_data(cfg, data_dir=tmp_path, seed=0)
    check_classification(b, cfg)
    x = b.train.inputs
    assert x.dtype.is_floating_point and x.shape == (64, 64)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert b.info["test_pool_size"] == 360 and b.info["pool_size"] == 1437
    assert b.info["noise_rate_pool"] == pytest.approx(round(0.4 * 1437) / 1437)
    full = build_data(DatasetConfig(name="digits_n"), data_dir=tmp_path, seed=0)
    assert len(full.val) == 144 and len(full.train) == 1437 - 144 and len(full.test) == 360
    assert np.bincount(full.test.labels.numpy()).min() >= 35  # stratified test split
    other = build_data(DatasetConfig(name="digits_n"), data_dir=tmp_path, seed=1)
    assert not np.array_equal(full.noisy, other.noisy[: len(full.noisy)])
