"""``spl``: Self-Paced Learning (Kumar et al. 2010) as a policy (weights 0/1)."""
from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch

from lai.policies.base import Policy, as_float, check_real
from lai.policies.registry import PolicyOptions, register_policy


class SPLPolicy(Policy):
    """Keep the samples whose loss is ``< lambda``; ``lambda`` grows every epoch.

    Used with the ``spl`` estimator, whose value is ``-loss`` (higher = easier), so a sample
    is kept iff ``value > -lambda``. ``lambda`` starts at ``spl_lambda`` if given, else it is
    set at the first active :meth:`select` call to the ``spl_start_fraction`` quantile
    (linear interpolation, ``torch.quantile``) of that batch's losses ``-values``. It is
    multiplied by ``spl_growth`` once per epoch elapsed since the last epoch seen, starting
    with the epoch after the first one in which it was used (warm-up epochs do not count).
    A batch may keep no sample at all (the trainer then skips the step), as in the
    definition. ``lambda`` stays on the device; :attr:`current_lambda` reads it (one sync).
    """

    name = "spl"

    def __init__(self, spl_start_fraction: float = 0.5, spl_lambda: Optional[float] = None,
                 spl_growth: float = 1.1, start_epoch: int = 0):
        super().__init__(start_epoch)
        q = check_real("spl_start_fraction", spl_start_fraction)
        if not 0.0 < q <= 1.0:
            raise ValueError("policy.spl_start_fraction must be in (0, 1], got "
                             f"{spl_start_fraction!r}")
        g = check_real("spl_growth", spl_growth)
        if g < 1.0:
            raise ValueError(f"policy.spl_growth must be >= 1, got {spl_growth!r}")
        lam = None
        if spl_lambda is not None:
            lam = check_real("spl_lambda", spl_lambda)
            if lam <= 0:
                raise ValueError(f"policy.spl_lambda must be > 0 (or null), got {spl_lambda!r}")
        self.spl_start_fraction, self.spl_growth, self.spl_lambda = q, g, lam
        self._lambda0: Optional[torch.Tensor] = None  # lambda when first used (0-d tensor)
        self._growths = 0  # epochs elapsed since then (lambda = lambda0 * growth ** this)
        self._last_epoch: Optional[int] = None

    @property
    def current_lambda(self) -> Optional[float]:
        """The loss threshold now; ``spl_lambda`` (None if unset) before the first use."""
        if self._lambda0 is None:
            return self.spl_lambda
        return float(self._lambda0) * self.spl_growth ** self._growths

    def reset(self) -> None:
        """Forget lambda and the epochs seen (a fresh run)."""
        self._lambda0, self._growths, self._last_epoch = None, 0, None

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        losses = -as_float(values)
        if self._lambda0 is None:
            if self.spl_lambda is not None:
                self._lambda0 = torch.tensor(self.spl_lambda, dtype=losses.dtype,
                                             device=losses.device)
            else:
                self._lambda0 = torch.quantile(losses, self.spl_start_fraction)
            self._last_epoch = epoch
        elif epoch > self._last_epoch:
            self._growths += epoch - self._last_epoch
            self._last_epoch = epoch
        lam = self._lambda0.to(device=losses.device, dtype=losses.dtype)
        return (losses < lam * self.spl_growth ** self._growths).float()


@dataclass
class SPLOptions(PolicyOptions):
    """``policy=spl``."""

    name: str = "spl"
    spl_start_fraction: float = 0.5  # initial lambda = this quantile of the first losses
    spl_lambda: Optional[float] = None  # initial lambda (loss threshold); None = quantile
    spl_growth: float = 1.1  # lambda multiplied by this every epoch; >= 1


register_policy(SPLPolicy, SPLOptions, estimator="spl")  # SPL's value is -loss
