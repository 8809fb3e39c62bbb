"""Dataset name -> builder, and :func:`build_data`, the one entry point runs use.

A builder has the signature ``builder(cfg, *, data_dir, seed, tokenizer=None) -> DataBundle``
where ``cfg`` is a :class:`lai.config.DatasetConfig` (or an OmegaConf node with its fields).
Each data module registers its names with :func:`register_dataset` (whether the builder
needs a tokenizer, which folders under ``data_dir`` it reads); every module of ``lai.data``
is imported at the end of this module. A plug-in module (``$LAI_PLUGINS``) registers the same
way; see ``docs/extending.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lai.data.base import DataBundle

Builder = Callable[..., DataBundle]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its builder, whether it is text (the builder needs
    ``tokenizer=``), and the folders under ``data_dir`` its files live in (their checksums
    are verified before a run)."""

    build: Builder
    text: bool = False
    folders: tuple[str, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> DataBundle:
        return self.build(*args, **kwargs)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, build: Builder, *, text: bool = False,
                     folders: tuple[str, ...] = ()) -> None:
    """Register dataset ``name`` (a ValueError if another builder has it already)."""
    old = DATASETS.get(name)
    if old is not None and old.build is not build:
        raise ValueError(f"dataset {name!r} is registered already (by {old.build.__module__})")
    DATASETS[name] = DatasetSpec(build, bool(text), tuple(folders))


def needs_tokenizer(name: str) -> bool:
    """Whether dataset ``name`` is text (its builder needs ``tokenizer=``)."""
    return name in DATASETS and DATASETS[name].text


def dataset_folders(name: str) -> tuple[str, ...]:
    """The folders (relative to ``data_dir``) that dataset ``name``'s builder reads from."""
    return DATASETS[name].folders if name in DATASETS else ()


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


# the built-in datasets register themselves (after everything above exists): every module
# of lai.data is imported, so a new dataset is a new file
from lai.plugins import import_submodules  # noqa: E402

import_submodules("lai.data")
