"""The data contract every dataset builder meets.

A builder returns a :class:`DataBundle`: three indexed splits (train = what training sees,
possibly with noisy labels; val = a *clean* split used for valuation; test), plus what later
stages need to know (class count, which training labels are noisy, how to collate and
preprocess). Collated batches are :class:`lai.batching.Batch` objects whose ``idx`` holds the
row's position in its split (0..N-1), so per-sample records can be stored by dataset index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from lai.batching import Batch


class TensorSplit(Dataset):
    """A split held in memory as tensors: ``inputs`` (tensor or dict of tensors, leading dim N)
    and ``labels`` ``[N]`` (or ``[N, T]`` for language modelling).

    ``__getitem__`` returns the row index only; :meth:`collate` gathers rows in one indexing
    operation per tensor, so there is no per-sample Python work in the hot loop.
    """

    def __init__(self, inputs: Any, labels: torch.Tensor, trim_key: str | None = None,
                 lengths: torch.Tensor | None = None):
        self.inputs = inputs
        self.labels = labels
        self.trim_key = trim_key  # for padded token tensors: trim each batch to its longest row
        self.lengths = lengths    # [N] real lengths when trim_key is set

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> int:
        return i

    def gather(self, rows: torch.Tensor) -> Batch:
        """The batch of the given row indices ``[B]`` (``idx`` = those indices)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if isinstance(self.inputs, dict):
            inputs = {k: v[rows] for k, v in self.inputs.items()}
            labels = self.labels[rows]
            if self.trim_key is not None and self.lengths is not None:
                t = int(self.lengths[rows].max())
                inputs = {k: (v[:, :t] if v.dim() == 2 else v) for k, v in inputs.items()}
                if labels.dim() == 2:
                    labels = labels[:, :t]
        else:
            inputs = self.inputs[rows]
            labels = self.labels[rows]
        return Batch(inputs, labels, rows)

    def collate(self, rows: list[int]) -> Batch:
        return self.gather(torch.as_tensor(rows, dtype=torch.long))

    def subset(self, rows: np.ndarray | torch.Tensor) -> "TensorSplit":
        """A new split made of the given rows (re-indexed 0..len(rows)-1)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        inputs = ({k: v[rows] for k, v in self.inputs.items()} if isinstance(self.inputs, dict)
                  else self.inputs[rows])
        lengths = self.lengths[rows] if self.lengths is not None else None
        return TensorSplit(inputs, self.labels[rows], self.trim_key, lengths)


def identity_preprocess(inputs: Any, train: bool) -> Any:
    return inputs


@dataclass
class DataBundle:
    """Everything a run needs from a dataset.

    - ``train``/``val``/``test``: :class:`TensorSplit` objects. ``val`` has clean labels.
    - ``task``: ``"classification"`` or ``"lm"`` (causal language modelling).
    - ``num_classes``: classes (classification) or vocabulary size (lm).
    - ``noisy``: bool ``[len(train)]``, True where the training label differs from the clean
      label; ``None`` when the dataset has no notion of label noise (GLUE, Pile).
    - ``clean_train_labels``: ``[len(train)]`` clean labels where known, else ``None``.
    - ``preprocess(inputs, train)``: applied on the device right before the model (vision:
      uint8 -> normalised float, random crop/flip when ``train``); identity for text.
    - ``info``: name, sources used, sizes, noise rate: written into the run record.
    """

    name: str
    task: str
    num_classes: int
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    noisy: np.ndarray | None = None
    clean_train_labels: np.ndarray | None = None
    preprocess: Callable[[Any, bool], Any] = identity_preprocess
    class_names: list[str] | None = None
    info: dict = field(default_factory=dict)


from lai.errors import MissingDataError  # noqa: E402  (re-exported: lai.data.MissingDataError)
