"""``threshold``: keep the samples whose value is at least a fixed threshold (weights 0/1)."""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from lai.policies.base import Policy
from lai.policies.registry import PolicyOptions, register_policy


class ThresholdPolicy(Policy):
    """Keep samples whose value is ``>= threshold`` (default 0: drop the harmful ones)."""

    name = "threshold"

    def __init__(self, threshold: float = 0.0, start_epoch: int = 0):
        super().__init__(start_epoch)
        try:
            self.threshold = float(threshold)
        except (TypeError, ValueError):
            raise ValueError(f"policy.threshold must be a number, got {threshold!r}") from None
        if math.isnan(self.threshold):
            raise ValueError("policy.threshold must not be NaN")
        # threshold -inf keeps every (finite) value: scoring only, nothing to wait for
        self.may_drop_all = self.threshold > -math.inf
        self.keeps_all_unweighted = not self.may_drop_all

    def fixed_kept(self, batch_size: int) -> int | None:
        return None if self.may_drop_all else batch_size

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        return (values >= self.threshold).float()


@dataclass
class ThresholdOptions(PolicyOptions):
    """``policy=threshold``."""

    name: str = "threshold"
    threshold: float = 0.0  # keep samples with value >= threshold


register_policy(ThresholdPolicy, ThresholdOptions)
