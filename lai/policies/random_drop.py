"""``random``: the random-drop control. Keeps each sample with a probability that does not
depend on its value, matched to another run's kept fraction per epoch or fixed.

A curation method that drops 40% of every batch changes the training in two ways: *which*
samples it drops, and *that* it drops 40% (fewer samples per step, a smaller effective
epoch). This policy reproduces only the second, so a method's gain over its matched random
control is what its choice of samples is worth.

Draws are a pure function of ``(seed, step)`` (and the data-parallel rank): the same run
gives the same decisions after a resume, and two controls with the same seed and rates drop
the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import os
from typing import Any, Optional, Sequence

import torch

from lai.policies.base import Policy, check_real
from lai.policies.registry import PolicyOptions, register_policy

# a fixed offset keeps the control's stream apart from the data-order and model-init streams
_STREAM = 0x5EED_D809


class RandomDropPolicy(Policy):
    """Keep each sample independently with probability ``p``: ``p = keep_fraction``, or
    ``epoch_keep_fractions[epoch]`` when a matched run's record gave one per epoch.

    :meth:`draw` gives the batch's uniform draws ``u [B]`` in ``[0, 1)``; a sample is kept iff
    ``u >= 1 - p``, so ``u`` acts as a value (higher = kept) and recording it shows chance-level
    noisy-label detection. :meth:`weights` ignores the values it is given (an estimator's, which
    are then only recorded) and uses the draws.
    """

    name = "random"
    needs_values = False

    def __init__(self, keep_fraction: float = 0.5, match: Optional[str] = None,
                 start_epoch: int = 0, seed: int = 0):
        """``match``: a run folder, its summary.json, or a method name looked up beside this
        run (:mod:`lai.policies.matching`); read by :meth:`prepare`. Without it every epoch
        keeps ``keep_fraction``."""
        super().__init__(start_epoch)
        self.keep_fraction = _fraction("keep_fraction", keep_fraction)
        if match is not None and (not isinstance(match, str) or not match.strip()):
            raise ValueError(f"policy.match must be a run folder or a method name, got {match!r}")
        self.match = match
        self.epoch_keep_fractions: Optional[list] = None
        self.matched_from: Optional[str] = None
        self.seed = int(seed)
        self.rank = 0

    def set_schedule(self, fractions: Sequence[float], source: Optional[str] = None) -> None:
        """Use ``fractions[epoch]`` as the keep probability of each epoch (a matched run's)."""
        fr = [_fraction("match (a recorded kept fraction)", f, allow_zero=True)
              for f in fractions]
        if not fr:
            raise ValueError("policy=random: the matched run recorded no epochs")
        self.epoch_keep_fractions, self.matched_from = fr, source

    def prepare(self, cfg: Any) -> None:
        """The run's seed; with ``match``, the matched run's kept fraction per epoch (raises
        :class:`lai.policies.matching.MatchError` when it is missing, ambiguous or shorter)."""
        from lai.policies.matching import MatchError, matched_keep_fractions

        self.seed = int(cfg.seed)
        # data-parallel ranks draw for their own shards: independent streams per rank
        self.rank = int(os.environ.get("RANK", "0"))
        if self.match is None:
            return
        fractions, source = matched_keep_fractions(cfg)
        self.set_schedule(fractions, source)
        epochs = int(cfg.trainer.epochs)
        if len(fractions) < epochs:
            raise MatchError(f"policy.match: the matched run ({source}) recorded "
                             f"{len(fractions)} epochs but this run trains {epochs}")

    def own_values(self, batch_size: int, step: int, device: torch.device) -> torch.Tensor:
        return self.draw(batch_size, step, device)

    def record(self) -> dict:
        if self.epoch_keep_fractions is None:
            return {"random_keep_probability": self.keep_fraction}
        return {"random_matched_run": self.matched_from,
                "random_keep_probabilities": list(self.epoch_keep_fractions)}

    def keep_probability(self, epoch: int) -> float:
        """The probability that a sample of ``epoch`` is kept."""
        if self.epoch_keep_fractions is None:
            if self.match is not None:
                raise RuntimeError(f"policy=random with match={self.match!r}: call "
                                   "prepare(cfg) first to read the matched run")
            return self.keep_fraction
        if epoch >= len(self.epoch_keep_fractions):
            raise ValueError(f"policy=random: no matched kept fraction for epoch {epoch} "
                             f"({len(self.epoch_keep_fractions)} recorded)")
        return self.epoch_keep_fractions[epoch]

    def draw(self, batch_size: int, step: int, device: torch.device | str = "cpu"
             ) -> torch.Tensor:
        """``[batch_size]`` float32 uniform draws in ``[0, 1)`` for optimizer step ``step``."""
        key = (self.seed * 1_000_003 + step) * 1_009 + self.rank
        gen = torch.Generator().manual_seed((key ^ _STREAM) & (2**63 - 1))
        return torch.rand(batch_size, generator=gen).to(device)

    def weights(self, values: torch.Tensor, step: int, epoch: int) -> torch.Tensor:
        p = self.keep_probability(epoch)
        u = self.draw(values.shape[0], step, values.device)
        return (u >= 1.0 - p).float() if p < 1.0 else torch.ones_like(u)

    def __repr__(self) -> str:
        rate = (f"matched={self.matched_from!r}" if self.epoch_keep_fractions is not None
                else f"keep_fraction={self.keep_fraction!r}")
        return f"RandomDropPolicy({rate}, start_epoch={self.start_epoch})"


def _fraction(name: str, x: object, allow_zero: bool = False) -> float:
    f = check_real(name, x)
    if not (0.0 <= f <= 1.0 if allow_zero else 0.0 < f <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"policy.{name} must be in {interval}, got {x!r}")
    return f


@dataclass
class RandomOptions(PolicyOptions):
    """``policy=random``."""

    name: str = "random"
    keep_fraction: float = 0.5  # keep each sample with this probability (unless match)
    match: Optional[str] = None  # keep the kept fraction per epoch of this run (a run
    # folder, or a method name looked up in results_dir with the same config)


register_policy(RandomDropPolicy, RandomOptions)
