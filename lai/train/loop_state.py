"""What the epoch loop has recorded so far, and how it goes into a checkpoint."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from lai.train.records import _jsonable


@dataclass
class LoopState:
    """The loop's records: ``step`` (optimizer steps taken), ``next_epoch`` (the epoch to
    run next), ``removed`` (samples dropped so far), ``history`` (one row per finished
    epoch), ``samples_per_epoch``, ``step_evals`` (evaluations at ``eval_at_steps``),
    ``last_eval``, ``all_values`` / ``all_kept`` (``[N]`` arrays per finished epoch) and
    ``elapsed_s`` (training seconds before this process). ``extra``: anything else to
    checkpoint (e.g. ``diverged_at_step``)."""

    step: int = 0
    next_epoch: int = 0
    removed: int = 0
    history: list = field(default_factory=list)
    samples_per_epoch: list = field(default_factory=list)
    step_evals: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    all_values: list = field(default_factory=list)
    all_kept: list = field(default_factory=list)
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)

    _RECORDS = ("next_epoch", "step", "removed", "history", "samples_per_epoch", "step_evals",
                "last_eval", "elapsed_s")

    def state_dict(self, elapsed_s: float) -> dict:
        """``{"loop": JSON text, "all_values": [tensors], "all_kept": [tensors]}`` with the
        training time so far ``elapsed_s`` (the checkpoint format, weights-only loadable)."""
        loop = {k: getattr(self, k) for k in self._RECORDS}
        loop.update(self.extra, elapsed_s=elapsed_s)
        return {"loop": json.dumps(_jsonable(loop)),
                "all_values": [torch.from_numpy(a) for a in self.all_values],
                "all_kept": [torch.from_numpy(a) for a in self.all_kept]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LoopState":
        """The records a :meth:`state_dict` (inside a checkpoint) holds."""
        loop = json.loads(state["loop"])
        out = cls(**{k: loop.pop(k) for k in cls._RECORDS if k in loop})
        out.last_eval = out.last_eval or {}
        out.extra = loop
        out.all_values = [t.numpy() for t in state["all_values"]]
        out.all_kept = [t.numpy() for t in state["all_kept"]]
        return out


@dataclass
class EpochPosition:
    """Where inside an epoch a checkpoint was taken: the next batch index ``i`` of the
    epoch's sample ``order``, the epoch's statistics so far (JSON of ``EpochStats``) and its
    per-sample values / keep decisions so far."""

    i: int
    order: torch.Tensor
    stats: str
    epoch_values: np.ndarray
    epoch_kept: np.ndarray

    def state_dict(self) -> dict:
        return {"i": int(self.i), "order": torch.as_tensor(self.order).cpu(),
                "stats": self.stats, "epoch_values": torch.from_numpy(self.epoch_values.copy()),
                "epoch_kept": torch.from_numpy(self.epoch_kept.copy())}

    @classmethod
    def from_state_dict(cls, state: Optional[dict]) -> Optional["EpochPosition"]:
        if state is None:
            return None
        return cls(int(state["i"]), state["order"], state["stats"],
                   state["epoch_values"].numpy().copy(), state["epoch_kept"].numpy().copy())


def summary_of(history: list, last_eval: dict) -> dict[str, Any]:
    """The test/validation fields of a run's summary from its epoch rows and last
    evaluation."""
    test_accs = [r["test_acc"] for r in history if "test_acc" in r] or [last_eval["test_acc"]]
    return {"final_test_acc": last_eval["test_acc"], "best_test_acc": max(test_accs),
            "final_test_loss": last_eval["test_loss"], "final_val_loss": last_eval["val_loss"],
            "final_val_acc": last_eval["val_acc"]}
