"""conf/model/*.yaml files only set ModelConfig fields, with the right types."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lai.config import ModelConfig
from lai.models import MODELS

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
FILES = sorted(CONF.glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_model_yaml_matches_schema(path):
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    assert cfg.name in MODELS


def test_expected_files_exist():
    names = {p.stem for p in FILES}
    assert {"resnet18", "resnet18_cifar", "bert", "bert_minilm", "gpt_neo", "mlp", "small_cnn",
            "tiny_transformer"} <= names
