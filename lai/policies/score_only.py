"""``score_only``: value every sample but train on all of them with weight 1 (no curation)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lai.policies.base import Policy
from lai.policies.registry import PolicyOptions, register_policy


class ScoreOnlyPolicy(Policy):
    """Weight 1 for every sample whatever its value: the values are only recorded (summary,
    metrics, saved scores). Since training does not depend on them, an estimator whose values
    exist only after the backward (Ghost's probe form) may be used."""

    name = "score_only"
    may_drop_all = False
    keeps_all_unweighted = True

    def fixed_kept(self, batch_size: int) -> int:
        return batch_size

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        return torch.ones(values.shape[0], dtype=torch.float32, device=values.device)


@dataclass
class ScoreOnlyOptions(PolicyOptions):
    """``policy=score_only``."""

    name: str = "score_only"


register_policy(ScoreOnlyPolicy, ScoreOnlyOptions)
