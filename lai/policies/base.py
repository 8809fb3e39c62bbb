"""What to do with the scores: ``select(values, step, epoch) -> [B] weights``."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Policy(ABC):
    """Maps a batch's values ``[B]`` (positive = helps) to loss weights ``[B]``.

    ``start_epoch``: warm-up; before this (0-based) epoch every sample gets weight 1 and the
    runner does not score at all.
    """

    def __init__(self, start_epoch: int = 0):
        if start_epoch < 0:
            raise ValueError("policy.start_epoch must be >= 0")
        self.start_epoch = int(start_epoch)

    def active(self, epoch: int) -> bool:
        """Whether scores are used in this epoch (False during warm-up)."""
        return epoch >= self.start_epoch

    @abstractmethod
    def select(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        """``[B]`` float weights for the batch."""


class ThresholdPolicy(Policy):
    """Keep samples whose value is ``>= threshold`` (default 0: drop the harmful ones)."""

    def __init__(self, threshold: float = 0.0, start_epoch: int = 0):
        super().__init__(start_epoch)
        self.threshold = float(threshold)

    def select(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        if not self.active(epoch):
            return torch.ones_like(values, dtype=torch.float32)
        return (values >= self.threshold).float()


def build_policy(name: str, *, threshold: float = 0.0, start_epoch: int = 0) -> Policy:
    if name == "threshold":
        return ThresholdPolicy(threshold, start_epoch)
    raise ValueError(f"unknown policy {name!r}; available: threshold")
