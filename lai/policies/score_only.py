"""``score_only``: value every sample but train on all of them with weight 1 (no curation)."""
from __future__ import annotations

import torch

from lai.policies.base import Policy


class ScoreOnlyPolicy(Policy):
    """Weight 1 for every sample whatever its value: the values are only recorded (summary,
    metrics, saved scores). Since training does not depend on them, an estimator whose values
    exist only after the backward (Ghost's probe form) may be used."""

    name = "score_only"
    params = ()
    may_drop_all = False
    keeps_all_unweighted = True

    def fixed_kept(self, batch_size: int) -> int:
        return batch_size

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        return torch.ones(values.shape[0], dtype=torch.float32, device=values.device)
