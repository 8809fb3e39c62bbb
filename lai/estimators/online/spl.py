"""Self-Paced Learning's score (Kumar et al. 2010) in the estimator interface.

SPL has no validation set: a sample's "value" is minus its current training loss
(higher = easier). The ``spl`` policy keeps the samples whose loss is below a threshold
lambda that grows every epoch.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from lai.batching import Batch, logits_of, per_sample_loss
from lai.estimators.base import OnlineEstimator
from lai.estimators.registry import EstimatorOptions, register_estimator


class _LossCapture:
    def __init__(self, labels: torch.Tensor):
        self.labels = labels
        self.logits: torch.Tensor | None = None


class SPLEstimator(OnlineEstimator):
    """``score`` = ``-ell_j`` (float32 ``[B]``); ``refresh`` does nothing."""

    name = "spl"
    needs_validation = False

    def refresh(self, model: nn.Module, val_batch: Batch) -> None:
        return None

    @contextmanager
    def capture(self, model: nn.Module, batch: Batch) -> Iterator[_LossCapture]:
        cap = _LossCapture(batch.labels)

        def keep(mod, args, output) -> None:
            cap.logits = logits_of(output)

        handle = model.register_forward_hook(keep)
        try:
            yield cap
        finally:
            handle.remove()

    @torch.no_grad()
    def score(self, capture: _LossCapture) -> torch.Tensor:
        if capture.logits is None:
            raise RuntimeError("no forward ran inside capture()")
        return -per_sample_loss(capture.logits.detach().float(), capture.labels)


@register_estimator("spl", EstimatorOptions, policy="spl")  # keeps samples by loss
def _build_spl(options: EstimatorOptions) -> SPLEstimator:
    return SPLEstimator()
