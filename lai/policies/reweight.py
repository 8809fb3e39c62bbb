"""``reweight``: soft weights from values instead of dropping samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lai.policies.base import Policy, as_float, check_real
from lai.policies.registry import PolicyOptions, register_policy


class ReweightPolicy(Policy):
    """Soft weights: ``w = B * softmax(v / (temperature * std(v) + eps))``.

    ``v`` is the batch's values ``[B]``, ``std`` the population std (``unbiased=False``) and
    ``eps = 1e-12`` guards a zero std. Hence the weights are positive (up to float underflow
    for very small temperatures or extreme outliers), have mean 1 (sum ``B``, so the trainer's
    ``sum(w * loss) / sum(w)`` is a weighted mean), and preserve the order of the values;
    constant values give all ones. Dividing by ``std`` makes ``temperature`` scale-free:
    the weight ratio of two samples one std apart is ``exp(1 / temperature)``. The mean is
    subtracted before the division (softmax is shift-invariant, so the formula is unchanged;
    it only avoids overflow).
    """

    name = "reweight"
    may_drop_all = False  # the largest softmax weight is >= 1/B: never all zero
    eps = 1e-12

    def __init__(self, temperature: float = 1.0, start_epoch: int = 0):
        super().__init__(start_epoch)
        t = check_real("temperature", temperature)
        if t <= 0:
            raise ValueError(f"policy.temperature must be > 0, got {temperature!r}")
        self.temperature = t

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        v = as_float(values)
        scale = self.temperature * v.std(correction=0) + self.eps
        z = (v - v.mean()) / scale
        return torch.softmax(z, dim=0) * v.shape[0]


@dataclass
class ReweightOptions(PolicyOptions):
    """``policy=reweight``."""

    name: str = "reweight"
    temperature: float = 1.0  # softmax temperature in units of the batch's std; > 0


register_policy(ReweightPolicy, ReweightOptions)
