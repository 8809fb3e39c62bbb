"""``percentile``: keep the top ``keep_fraction`` of each batch by value (weights 0/1)."""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from lai.policies.base import Policy, check_real
from lai.policies.registry import PolicyOptions, register_policy


def keep_count(keep_fraction: float, batch_size: int) -> int:
    """``ceil(q * B)``, robust to float noise (``0.7 * 10`` keeps 7, not 8); >= 1 if B >= 1."""
    if batch_size <= 0:
        return 0
    n = math.ceil(round(keep_fraction * batch_size, 9))
    return min(batch_size, max(1, n))


class PercentilePolicy(Policy):
    """Keep exactly ``ceil(keep_fraction * B)`` samples: the ones with the highest values.

    Ties are broken by the lower batch index first (a stable descending sort), so the choice
    is deterministic. Everything stays on the device (no host sync). NaN values sort as the
    largest in ``torch.sort``; the scores should not contain any.
    """

    name = "percentile"
    may_drop_all = False  # keeps ceil(q * B) >= 1

    def __init__(self, keep_fraction: float = 0.5, start_epoch: int = 0):
        super().__init__(start_epoch)
        q = check_real("keep_fraction", keep_fraction)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"policy.keep_fraction must be in (0, 1], got {keep_fraction!r}")
        self.keep_fraction = q
        self.keeps_all_unweighted = q >= 1.0

    def fixed_kept(self, batch_size: int) -> int:
        return keep_count(self.keep_fraction, batch_size)

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        b = values.shape[0]
        n = keep_count(self.keep_fraction, b)
        w = torch.zeros(b, dtype=torch.float32, device=values.device)
        if n == b:
            return w.fill_(1.0)
        order = torch.sort(values.detach(), descending=True, stable=True).indices
        w[order[:n]] = 1.0
        return w


@dataclass
class PercentileOptions(PolicyOptions):
    """``policy=percentile``."""

    name: str = "percentile"
    keep_fraction: float = 0.5  # keep the top q of each batch, q in (0, 1]


register_policy(PercentilePolicy, PercentileOptions)
