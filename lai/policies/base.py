"""What to do with the scores: ``select(values, step, epoch) -> [B] weights``.

Sign convention: ``values`` are VALUES, positive = the sample helps. Every policy returns a
float32 ``[B]`` tensor on the device of ``values`` and never modifies ``values``. The trainer
uses ``sum(w * loss) / sum(w)`` and skips the optimizer step when every weight is 0.

The concrete policies live in one module each, which registers the policy with its typed
options dataclass in :data:`lai.policies.registry.POLICIES` (the single source of policy
names); :func:`lai.policies.build_policy` builds one by name.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional, Tuple

import torch


class Policy(ABC):
    """Maps a batch's values ``[B]`` (positive = helps) to loss weights ``[B]``.

    ``start_epoch``: warm-up; before this (0-based) epoch every sample gets weight 1, the
    runner does not score at all, and :meth:`weights` is not called (no state changes).

    Subclasses set ``name`` (the config name) and implement :meth:`weights`; registering
    them (:func:`lai.policies.registry.register_policy`) sets ``params``, the fields of
    their options dataclass that the constructor takes besides ``start_epoch``.
    """

    name: ClassVar[str] = ""
    params: ClassVar[Tuple[str, ...]] = ()
    # Whether a batch can end with every weight 0. The trainer skips the optimizer step then,
    # which needs the count on the host (one sync per step); a policy that can never drop a
    # whole batch says False and its steps run without any host sync.
    may_drop_all: bool = True  # class default; a policy may set it per instance
    # every sample gets weight 1 whatever its value (scoring without curation): the trainer
    # may then take values that exist only after the backward (Ghost's probe form)
    keeps_all_unweighted: bool = False
    # False: the weights do not depend on the values (the random-drop control); with
    # estimator=vanilla the trainer then takes the policy's own values (:meth:`own_values`)
    # and runs no estimator
    needs_values: bool = True

    def __init__(self, start_epoch: int = 0):
        if isinstance(start_epoch, float) and not float(start_epoch).is_integer():
            raise ValueError(f"policy.start_epoch must be an integer >= 0, got {start_epoch!r}")
        if start_epoch < 0:
            raise ValueError("policy.start_epoch must be >= 0")
        self.start_epoch = int(start_epoch)

    def active(self, epoch: int) -> bool:
        """Whether scores are used in this epoch (False during warm-up)."""
        return epoch >= self.start_epoch

    def select(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        """``[B]`` float32 weights for the batch (all ones during warm-up)."""
        if values.dim() != 1:
            raise ValueError(f"policy expects values of shape [B], got {tuple(values.shape)}")
        if not self.active(epoch):
            return torch.ones(values.shape, dtype=torch.float32, device=values.device)
        if values.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=values.device)
        return self.weights(values, step, epoch).to(torch.float32)

    def fixed_kept(self, batch_size: int) -> Optional[int]:
        """How many samples of a ``batch_size`` batch get a nonzero weight, when that does not
        depend on the values (``None`` otherwise). ``two_pass`` then picks the kept rows on
        the device, without waiting for the count."""
        return None

    def prepare(self, cfg: Any) -> None:
        """Bind the policy to the run the composed config ``cfg`` describes, before training
        (the random control reads its seed and its matched run here). Default: nothing."""

    def own_values(self, batch_size: int, step: int, device: torch.device) -> torch.Tensor:
        """``[batch_size]`` values of a policy that needs none (``needs_values`` False); they
        are recorded as the batch's values. Only such policies implement it."""
        raise NotImplementedError(f"policy {self.name!r} needs values from an estimator")

    def record(self) -> dict:
        """What the run's summary should say about the policy beyond its config (JSON-able)."""
        return {}

    @abstractmethod
    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        """Weights for a non-empty batch in an active epoch; must not modify ``values``."""

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self.params)
        sep = ", " if args else ""
        return f"{type(self).__name__}({args}{sep}start_epoch={self.start_epoch})"


# ---- helpers shared by the policies ------------------------------------------------------
def as_float(values: torch.Tensor) -> torch.Tensor:
    """``values`` detached, as float32 unless already float32/float64 (never a copy to host)."""
    values = values.detach()
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


def check_real(name: str, x: Any) -> float:
    """``float(x)``, or a one-line ValueError if it is not a finite number."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"policy.{name} must be a number, got {x!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"policy.{name} must be finite, got {x!r}")
    return f
