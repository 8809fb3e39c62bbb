"""Dataset name -> builder, and :func:`build_data`, the one entry point runs use.

A builder has the signature ``builder(cfg, *, data_dir, seed, tokenizer=None) -> DataBundle``
where ``cfg`` is a :class:`lai.config.DatasetConfig` (or an OmegaConf node with its fields).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from lai.data.base import DataBundle
from lai.data.digits import build_digits
from lai.data.lm import build_pile
from lai.data.text import SPECS as TEXT_SPECS
from lai.data.text import build_text_classification
from lai.data.vision import VARIANTS as CIFAR_VARIANTS
from lai.data.vision import build_cifar

Builder = Callable[..., DataBundle]

DATASETS: dict[str, Builder] = {
    **{name: build_cifar for name in CIFAR_VARIANTS},
    **{name: build_text_classification for name in TEXT_SPECS},
    "pile": build_pile,
    "digits_n": build_digits,
}
TEXT_DATASETS = frozenset([*TEXT_SPECS, "pile"])  # need a tokenizer


def needs_tokenizer(name: str) -> bool:
    """Whether dataset ``name`` is text (its builder needs ``tokenizer=``)."""
    return name in TEXT_DATASETS


def build_data(cfg: Any, *, data_dir: Path, seed: int, tokenizer: Any = None) -> DataBundle:
    """Build the :class:`DataBundle` named by ``cfg.name``.

    ``data_dir``: the resolved data folder (see :func:`lai.data.paths.resolve_data_dir`);
    ``seed``: the run seed (noise, hold-out and limits derive their seeds from it);
    ``tokenizer``: required for text datasets (Hugging Face call convention).
    Raises ``ValueError`` for an unknown name or a missing tokenizer, and
    :class:`~lai.data.base.MissingDataError` when the files are absent.
    """
    name = cfg.name
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    if needs_tokenizer(name) and tokenizer is None:
        raise ValueError(f"dataset {name!r} is text and needs a tokenizer: pass tokenizer=... "
                         "(e.g. lai.models.tokenizers.ByteTokenizer() or a Hugging Face tokenizer)")
    if not 0.0 <= float(cfg.noise_rate) < 1.0:
        raise ValueError(f"noise_rate must be in [0, 1); got {cfg.noise_rate}")
    return DATASETS[name](cfg, data_dir=Path(data_dir), seed=int(seed), tokenizer=tokenizer)
