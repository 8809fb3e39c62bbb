"""Dataset builders: every dataset becomes a :class:`DataBundle` of indexed tensor splits.

``build_data(cfg, data_dir=resolve_data_dir(cfg_data_dir), seed=seed, tokenizer=tok)``.
"""
from lai.data.base import DataBundle, MissingDataError, TensorSplit
from lai.data.paths import resolve_data_dir
from lai.data.registry import DATASETS, build_data, needs_tokenizer

__all__ = ["build_data", "DATASETS", "needs_tokenizer", "resolve_data_dir", "MissingDataError",
           "DataBundle", "TensorSplit"]
