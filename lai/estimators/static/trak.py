"""TRAK (Park et al. 2023), static, with the margin output function and random projections.

Output function (the "margin"): for a sample with label ``y`` and class probabilities ``p``,

    f(z) = log( p_y / (1 - p_y) ) = s_y - logsumexp_{c != y} s_c       (s = logits),

averaged over the non-ignored tokens for language-model labels ``[B, T]`` (``-100`` ignored).
Features are projected per-sample gradients of ``f`` over **all trainable parameters**:

    phi_z = P^T grad f(z),    P = [num_params, k] i.i.d. N(0, 1) / sqrt(k),

``P`` never stored whole: it is regenerated in fixed row blocks from a ``torch.Generator``
seeded with ``seed`` (same seed, device and dtype -> same ``P``), each block multiplied into a
chunk of at most ``chunk_size`` per-sample gradients. With ``Phi = [phi_1 ... phi_N]^T`` the
training features, ``Q_j = 1 - p_{y_j}`` (token average for LM; ``= sigmoid(-f(j))``) and
``K = Phi^T Phi + damping I`` (pseudo-inverse when ``K`` is singular), the score of training
sample j for a target z is ``phi_z^T K^{-1} phi_j Q_j``; the value (positive = helps the
validation margins) is the sum over the validation set,

    v_j = (sum_{z in V} phi_z)^T K^{-1} phi_j Q_j,

where ``sum_z phi_z = P^T grad sum_z f(z)`` needs one backward pass, not per-sample
gradients. With ``checkpoints`` (state_dicts loaded into a copy of the model) the values are
averaged over the checkpoints, all with the same ``P``.

The model's current mode is used. For BatchNorm models prefer eval mode: in train mode the
per-sample gradients are taken on each sample alone (its own batch statistics).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lai.batching import IGNORE_INDEX, Batch, forward_logits
from lai.estimators.capture import preserved_buffers
from lai.estimators.static.datainf import per_sample_gradient_chunks, trainable_named_parameters
from lai.estimators.registry import StaticOptions, register_estimator

PROJ_BLOCK_ELEMS = 1 << 24  # entries of one generated block of P (64 MiB in float32)
# P is kept between calls when it has at most this many entries (1 GiB in float32); larger
# projections are regenerated block by block for every chunk (same numbers, less memory).
PROJ_CACHE_ELEMS = 1 << 28


def margins(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample margin ``f = log(p_y / (1 - p_y))`` and residual ``Q = 1 - p_y``, both
    ``[B]`` (token means for ``logits [B, T, V]`` / ``labels [B, T]``, ``-100`` ignored)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    keep = labels != IGNORE_INDEX
    y = labels.clamp_min(0)
    classes = torch.arange(logits.shape[-1], device=logits.device)
    is_y = classes == y.unsqueeze(-1)
    s_y = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    f = s_y - logits.masked_fill(is_y, float("-inf")).logsumexp(-1)
    q = torch.sigmoid(-f)
    if logits.dim() == 2:
        return f, q
    w = keep.to(f.dtype)
    count = w.sum(1).clamp_min(1)
    return (f * w).sum(1) / count, (q * w).sum(1) / count


def _sample_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return margins(logits, labels)[0][0]


class _Projector:
    """Applies ``P = randn(num_params, k) / sqrt(k)`` to rows ``[c, num_params]``, generating
    ``P`` in fixed blocks of rows from a generator reseeded at every call. When ``P`` has at
    most ``cache_elems`` entries its blocks are kept after the first call: generating P is
    what dominates on a CPU, and the numbers are the same either way."""

    def __init__(self, num_params: int, k: int, seed: int, device: torch.device,
                 dtype: torch.dtype, cache_elems: int | None = None):
        self.num_params, self.k, self.seed = num_params, k, int(seed)
        self.device, self.dtype = device, dtype
        self.rows = max(1, min(num_params, PROJ_BLOCK_ELEMS // k))
        limit = PROJ_CACHE_ELEMS if cache_elems is None else cache_elems
        self.cache: list[torch.Tensor] | None = [] if num_params * k <= limit else None

    def _blocks(self):
        if self.cache:  # filled by an earlier call
            yield from self.cache
            return
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        for r0 in range(0, self.num_params, self.rows):
            r1 = min(self.num_params, r0 + self.rows)
            block = torch.randn(r1 - r0, self.k, generator=gen, device=self.device,
                                dtype=self.dtype)
            if self.cache is not None:
                self.cache.append(block)
            yield block

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape[0], self.k, dtype=self.dtype, device=self.device)
        r0 = 0
        for block in self._blocks():
            r1 = r0 + block.shape[0]
            out.addmm_(g[:, r0:r1].to(self.dtype), block)
            r0 = r1
        return out.div_(math.sqrt(self.k))


def _flat(grads: dict[str, torch.Tensor], names: list[str], dtype: torch.dtype) -> torch.Tensor:
    c = grads[names[0]].shape[0]
    return torch.cat([grads[n].reshape(c, -1).to(dtype) for n in names], dim=1)


def _budget(device: torch.device) -> float:
    """Half the free CUDA memory, or half of MemAvailable on CPU (inf if unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def trak_memory_estimate(n_train: int, proj_dim: int, chunk_size: int, num_params: int,
                         itemsize: int = 4) -> int:
    """Bytes TRAK holds at its peak: ``Phi [N, k]``, ``K [k, k]`` (float64), a chunk of
    per-sample gradients ``[chunk, P]`` (twice: torch.func's output and its flattened copy)
    and ``P``: all of it when it is small enough to be kept (``PROJ_CACHE_ELEMS``), else one
    generated block."""
    rows = max(1, min(num_params, PROJ_BLOCK_ELEMS // proj_dim))
    p_elems = num_params * proj_dim if num_params * proj_dim <= PROJ_CACHE_ELEMS \
        else rows * proj_dim
    return int(itemsize * (n_train * proj_dim + 2 * chunk_size * num_params + p_elems)
               + 8 * proj_dim * proj_dim)


def _solve(kernel: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    if damping > 0:
        chol, info = torch.linalg.cholesky_ex(kernel)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.unsqueeze(1), chol).squeeze(1)
    return torch.linalg.pinv(kernel, hermitian=True) @ rhs


def _trak_single(model: nn.Module, train_batches: Sequence[Batch], val_batches: Sequence[Batch],
                 proj_dim: int, damping: float, seed: int, chunk_size: int,
                 dtype: torch.dtype) -> torch.Tensor:
    named = trainable_named_parameters(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    device = params[0].device
    num_params = sum(p.numel() for p in params)
    project = _Projector(num_params, proj_dim, seed, device, dtype)
    n_train = sum(len(b) for b in train_batches)

    phi = torch.empty(n_train, proj_dim, dtype=dtype, device=device)
    row = 0
    for g in per_sample_gradient_chunks(model, train_batches, chunk_size, _sample_margin):
        flat = _flat(g, names, dtype)
        del g
        phi[row:row + flat.shape[0]] = project(flat)
        row += flat.shape[0]
        del flat

    with preserved_buffers(model):
        with torch.no_grad():
            q = torch.cat([margins(forward_logits(model, b.inputs), b.labels)[1].to(dtype)
                           for b in train_batches])
        g_v = [torch.zeros(p.numel(), dtype=dtype, device=device) for p in params]
        with torch.enable_grad():
            for batch in val_batches:
                for start in range(0, len(batch), chunk_size):
                    chunk = batch.select(torch.arange(start, min(len(batch), start + chunk_size)))
                    f = margins(forward_logits(model, chunk.inputs), chunk.labels)[0].sum()
                    grads = torch.autograd.grad(f, params, allow_unused=True)
                    for acc, gr in zip(g_v, grads):
                        if gr is not None:
                            acc.add_(gr.reshape(-1).to(dtype))
    phi_v = project(torch.cat(g_v).unsqueeze(0))[0]
    del g_v

    kernel = torch.zeros(proj_dim, proj_dim, dtype=torch.float64, device=device)
    step = max(1, PROJ_BLOCK_ELEMS // (4 * proj_dim))
    for r0 in range(0, n_train, step):
        block = phi[r0:r0 + step].double()
        kernel.addmm_(block.T, block)
    if damping:
        kernel.diagonal().add_(float(damping))
    x = _solve(kernel, phi_v.double(), float(damping))
    del kernel
    scores = torch.cat([phi[r0:r0 + step].double() @ x for r0 in range(0, n_train, step)])
    return (scores * q.double()).to(dtype)


def trak_values(model: nn.Module, train_batches: Sequence[Batch], val_batches: Sequence[Batch],
                hessian_batches: Sequence[Batch] | None = None, *, proj_dim: int = 2048,
                damping: float = 0.0, checkpoints: Sequence[dict] | None = None, seed: int = 0,
                chunk_size: int = 64, memory_budget_bytes: float | None = None) -> torch.Tensor:
    """``[N_train]`` TRAK values (positive = helps), in the order of ``train_batches``:

        v_j = (sum_{z in V} phi_z)^T (Phi^T Phi + damping I)^{-1} phi_j (1 - p_{y_j}),

    (``hessian_batches`` unused: TRAK's curvature is its own ``Phi^T Phi``.)
    ``phi = P^T grad f`` with the margin ``f = log(p_y / (1 - p_y))`` and a seeded Gaussian
    projection ``P [num_params, proj_dim] / sqrt(proj_dim)`` (see the module docstring),
    averaged over ``checkpoints`` (state_dicts; default: the current model only).

    Raises ``MemoryError`` (one line, estimate in GiB) when the estimated peak memory exceeds
    ``memory_budget_bytes`` (default: half the free CUDA memory of the model's device, or half
    of MemAvailable on CPU), or when CUDA runs out of memory. The model's current mode is
    used; its parameters and buffers are left unchanged.
    """
    if proj_dim < 1 or chunk_size < 1:
        raise ValueError(f"trak needs proj_dim >= 1 and chunk_size >= 1; got {proj_dim}, "
                         f"{chunk_size}")
    named = trainable_named_parameters(model)
    if not named:
        raise ValueError("trak: the model has no trainable parameters")
    device = named[0][1].device
    dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in named) else torch.float32
    num_params = sum(p.numel() for _, p in named)
    n_train = sum(len(b) for b in train_batches)
    estimate = trak_memory_estimate(n_train, proj_dim, chunk_size, num_params,
                                    torch.finfo(dtype).bits // 8)
    budget = _budget(device) if memory_budget_bytes is None else float(memory_budget_bytes)

    def too_big(what: str) -> MemoryError:
        return MemoryError(
            f"TRAK {what}: it needs about {estimate / 2**30:.3f} GiB ({n_train} train samples x "
            f"proj_dim {proj_dim}, chunk_size {chunk_size} x {num_params} parameters), budget "
            f"{budget / 2**30:.3f} GiB; lower proj_dim or chunk_size (or raise "
            "memory_budget_bytes)")

    if estimate > budget:
        raise too_big("would exceed the memory budget")
    if n_train == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    try:
        if checkpoints is None:
            return _trak_single(model, train_batches, val_batches, proj_dim, damping, seed,
                                chunk_size, dtype)
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise ValueError("trak: checkpoints is an empty list (use None for the current "
                             "model)")
        work = copy.deepcopy(model)
        total = torch.zeros(n_train, dtype=dtype, device=device)
        for state in checkpoints:
            work.load_state_dict(state)
            total += _trak_single(work, train_batches, val_batches, proj_dim, damping, seed,
                                  chunk_size, dtype)
        del work
        return total / len(checkpoints)
    except torch.cuda.OutOfMemoryError as e:
        raise too_big("ran out of CUDA memory") from e


@dataclass
class TrakOptions(StaticOptions):
    """``estimator=trak`` (runner=two_round)."""

    name: str = "trak"
    proj_dim: int = 2048  # random projection dimension
    damping: float = 0.0  # lambda of Phi^T Phi + lambda I
    trak_checkpoints: int = 1  # ensemble over this many round-1 checkpoints (last epochs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.proj_dim < 1 or self.trak_checkpoints < 1:
            raise ValueError("estimator.proj_dim and trak_checkpoints must be >= 1")
        if self.damping < 0:
            raise ValueError("estimator.damping must be >= 0")

    def checkpoint_epochs(self) -> int:
        return self.trak_checkpoints

    def keywords(self, seed: int, progress: bool, checkpoints: Any, info: dict) -> dict:
        """The keywords of :func:`trak_values` for a run."""
        return {"proj_dim": self.proj_dim, "damping": self.damping, "seed": seed,
                "checkpoints": checkpoints or None}


register_estimator("trak", TrakOptions, kind="static")(trak_values)
