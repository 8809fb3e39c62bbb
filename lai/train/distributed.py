"""Data parallelism over ``torchrun`` ranks (gloo on CPU, nccl on CUDA), without a DDP wrapper.

Every rank holds the whole model and draws the same global batch and the same validation
rows (the same seeded generators); rank r works on its contiguous share of each:

- validation cache: every online estimator here is linear in the validation set
  (docs/design.md §1), so each rank builds the cache of its share of the validation rows and the
  parts are summed with one all-reduce. The scores then equal a one-process run's (to float
  rounding of the sum). LAI/LLI use the folded cache (a sum); Ghost sums ``g_V``;
- the policy decides per rank, on that rank's own samples and values;
- the update: each rank's loss is ``sum_r(w * loss) / sum_all(w)`` (the kept weight summed
  over ranks by an all-reduce) and the gradients are summed by all-reduce, which gives the
  gradient of the one-process weighted mean. A batch in which no rank keeps anything is
  skipped on every rank;
- records: step statistics, per-sample values and keep decisions are summed over ranks at
  each flush; only rank 0 writes the run folder and the checkpoint.

``trainer.strategy=one_pass`` only (two_pass's second forward has rank-dependent shapes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of ``rows`` (the concatenation over ranks is
        ``rows``)."""
        return rows.tensor_split(self.world)[self.rank] if self.enabled else rows

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.SUM) if self.enabled else t

    @staticmethod
    def _reduce(t: torch.Tensor, op) -> torch.Tensor:
        if dist.get_backend() == "nccl" and not t.is_cuda:  # nccl reduces CUDA tensors only
            dev = torch.device("cuda", torch.cuda.current_device())
            buf = t.to(dev)
            dist.all_reduce(buf, op=op)
            return t.copy_(buf.cpu())
        dist.all_reduce(t, op=op)
        return t

    def sum_float(self, x: float) -> float:
        if not self.enabled:
            return x
        return float(self.sum_(torch.tensor([x], dtype=torch.float64)).item())

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, dist.ReduceOp.MAX) if self.enabled else t


def current() -> Dist:
    """The process group's rank and size (one process: rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def init_from_env(device: torch.device) -> Dist:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current()


def reduce_cache(estimator: Any, d: Dist) -> None:
    """Sum the validation cache over ranks (each rank built it from its validation share):
    the estimator's :meth:`~lai.estimators.base.OnlineEstimator.reduce_cache`."""
    if d.enabled:
        estimator.reduce_cache(d.sum_)


def sum_gradients(model: torch.nn.Module, d: Dist) -> None:
    """All-reduce (sum) every parameter's gradient; a missing gradient counts as zero."""
    if not d.enabled:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            d.sum_(p.grad)


def merge_epoch_arrays(values: np.ndarray, kept: np.ndarray, d: Dist) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Per-sample values (NaN = not scored here) and keep decisions (-1 = not seen here) of
    all ranks: every sample is scored by one rank only."""
    if not d.enabled:
        return values, kept
    v = torch.from_numpy(np.nan_to_num(values, nan=0.0)).double()
    n = torch.from_numpy(np.isfinite(values).astype(np.float64))
    d.sum_(v)
    d.sum_(n)
    k = d.max_(torch.from_numpy(kept.astype(np.int64)))
    # a row merged before (a mid-epoch checkpoint) is held by every rank: the mean is its value
    out = np.where(n.numpy() > 0, v.numpy() / np.maximum(n.numpy(), 1), np.nan).astype(np.float32)
    return out, k.numpy().astype(np.int8)
