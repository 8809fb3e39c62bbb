"""A toy online estimator registered from outside ``lai`` (as a user's plug-in would be):
``value_j = scale * <G_j, sum_{z in V} G_z>``, the agreement of output gradients
``G = d ell / d logits`` (LAI's output-layer term without the input products)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lai.batching import Batch, forward_logits, logits_of
from lai.estimators.base import OnlineEstimator, output_gradient
from lai.estimators.registry import OnlineOptions, register_estimator


@dataclass
class ToyOptions(OnlineOptions):
    name: str = "toy"
    scale: float = 1.0  # multiplies every value

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scale < 0:
            raise ValueError("estimator.scale must be >= 0")


class _Capture:
    def __init__(self, labels: torch.Tensor):
        self.labels, self.logits = labels, None


class ToyEstimator(OnlineEstimator):
    name = "toy"

    def __init__(self, scale: float):
        self.scale, self.g_v = scale, None

    @torch.no_grad()
    def refresh(self, model: nn.Module, val_batch: Batch) -> None:
        logits = forward_logits(model, val_batch.inputs)
        self.g_v = output_gradient(logits, val_batch.labels).sum(0)

    @contextmanager
    def capture(self, model: nn.Module, batch: Batch) -> Iterator[_Capture]:
        cap = _Capture(batch.labels)
        handle = model.register_forward_hook(
            lambda mod, args, out: setattr(cap, "logits", logits_of(out)))
        try:
            yield cap
        finally:
            handle.remove()

    def score(self, capture: _Capture) -> torch.Tensor:
        g = output_gradient(capture.logits, capture.labels)
        return (self.scale * (g @ self.g_v.to(g.dtype))).float()


@register_estimator("toy", ToyOptions)
def build_toy(options: ToyOptions) -> ToyEstimator:
    return ToyEstimator(options.scale)
