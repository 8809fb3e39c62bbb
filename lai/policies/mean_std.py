"""``mean_std``: drop the samples far below the batch mean (weights 0/1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lai.policies.base import Policy, as_float, check_real
from lai.policies.registry import PolicyOptions, register_policy


class MeanStdPolicy(Policy):
    """Drop samples whose value is ``< mean - k * std`` of the batch; keep the rest.

    What the paper's public code does for Ghost. ``std`` is the population std
    (``unbiased=False``), so a batch of one sample (std 0) keeps it. The threshold is capped
    at the batch maximum (which is >= the mean in exact arithmetic), so float rounding can
    never drop a whole batch, e.g. one of constant values with ``k = 0``.
    """

    name = "mean_std"
    may_drop_all = False  # the threshold is capped at the batch maximum

    def __init__(self, k: float = 1.0, start_epoch: int = 0):
        super().__init__(start_epoch)
        kk = check_real("k", k)
        if kk < 0:
            raise ValueError(f"policy.k must be >= 0, got {k!r}")
        self.k = kk

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        v = as_float(values)
        thr = v.mean() - self.k * v.std(correction=0)
        thr = torch.minimum(thr, v.max())
        return (v >= thr).float()


@dataclass
class MeanStdOptions(PolicyOptions):
    """``policy=mean_std``."""

    name: str = "mean_std"
    k: float = 1.0  # drop values below mean - k * std of the batch; k >= 0


register_policy(MeanStdPolicy, MeanStdOptions)
