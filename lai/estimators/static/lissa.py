"""LiSSA influence (Koh & Liang 2017, with the recursion of Agarwal et al. 2017), static.

Value of training sample j (positive = helps, i.e. up-weighting j lowers the validation loss):

    v_j = g_V^T (H + lambda I)^{-1} g_j,      g_V = sum_{z in V} grad ell_z,

with ``H`` the mean Hessian of the per-sample loss ``ell`` over the Hessian samples and
``g_j = grad ell_j``, over **all trainable parameters**.

``s = (H + lambda I)^{-1} g_V`` is approximated by the LiSSA recursion

    h_0 = g_V,    h_t = g_V + (I - (H_t + lambda I) / scale) h_{t-1},    s ~ h_depth / scale,

where ``H_t h`` is the Hessian-vector product of the **mean** loss of one Hessian batch
(double backward), the batches being taken in a seeded random order, reshuffled after each
pass over them. The series converges when ``scale`` exceeds the largest eigenvalue of
``H_t + lambda I`` and ``lambda`` exceeds any negative curvature; its error shrinks like
``(1 - (mu_min + lambda)/scale)^depth``. By default ``scale`` comes from the data (a power
iteration), a recursion stops once it stops changing, a diverging one is an error, and the
residual of the solve is reported (:func:`inverse_hvp`).
``repeats`` independent recursions (different orders) are averaged. Then every ``v_j`` is
the exact directional derivative ``<s, grad ell_j>`` (one forward-mode pass per training
batch, :func:`lai.estimators.online.ghost.directional_derivatives`): no per-sample gradient is ever
formed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from lai.batching import Batch, forward_logits, per_sample_loss
from lai.estimators.capture import preserved_buffers
from lai.estimators.registry import StaticOptions, register_estimator
from lai.estimators.online.ghost import trainable_parameters, validation_gradient
from lai.estimators.static import directional_values

DIVERGENCE = 1e6


def _work_dtype(p: torch.Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def total_validation_gradient(model: nn.Module, val_batches: Sequence[Batch],
                              chunk_size: int = 512) -> list[torch.Tensor]:
    """``g_V`` summed over every validation batch (trainable-parameter order), in at least
    float32."""
    params = trainable_parameters(model)
    total = [torch.zeros_like(p, dtype=_work_dtype(p)) for p in params]
    for batch in val_batches:
        for acc, g in zip(total, validation_gradient(model, batch, chunk_size)):
            acc.add_(g.to(acc.dtype))
    return total


def hessian_vector_product(model: nn.Module, batch: Batch,
                           vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` for the Hessian of the **mean** per-sample loss of ``batch`` (double backward),
    in trainable-parameter order; parameters the loss does not reach get zeros."""
    params = trainable_parameters(model)
    # fused attention kernels have no double backward; PyTorch's math backend has one
    with preserved_buffers(model), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        loss = per_sample_loss(forward_logits(model, batch.inputs), batch.labels).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = [torch.zeros_like(v) for v in vector]
        if used:
            try:
                hv = torch.autograd.grad(
                    [grads[i] for i in used], [params[i] for i in used],
                    grad_outputs=[vector[i].to(params[i].dtype) for i in used],
                    allow_unused=True)
            except RuntimeError as e:
                if "derivative for" in str(e) and "not implemented" in str(e):
                    raise NotImplementedError(
                        "lissa needs second derivatives (Hessian-vector products) through "
                        f"every operation of the model, and one has none: "
                        f"{str(e).splitlines()[0]}; use ip or datainf (first order)") from e
                raise
            for i, h in zip(used, hv):
                if h is not None:
                    out[i] = h.detach().to(vector[i].dtype)
    return out


class LissaDivergedError(RuntimeError):
    """The LiSSA recursion grew without bound: its values would be meaningless."""


def _norm(ts: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def top_eigenvalue(model: nn.Module, hessian_batches: Sequence[Batch], iterations: int = 20,
                   seed: int = 0) -> float:
    """Largest ``|eigenvalue|`` of the one-batch Hessians, by power iteration on
    Hessian-vector products cycling through ``hessian_batches`` (the largest estimate seen):
    what LiSSA's ``scale`` must exceed. ``iterations`` HVPs in all."""
    params = trainable_parameters(model)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    v = [torch.randn(p.shape, generator=gen).to(p.device, _work_dtype(p)) for p in params]
    n = _norm(v)
    v = [t / n for t in v]
    top = 0.0
    for k in range(iterations):
        hv = hessian_vector_product(model, hessian_batches[k % len(hessian_batches)], v)
        n = _norm(hv)
        if not math.isfinite(n) or n == 0.0:
            break
        top = max(top, n)
        v = [t / n for t in hv]
    return top


def mean_hvp(model: nn.Module, hessian_batches: Sequence[Batch],
             vector: list[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` for ``H`` the mean of the Hessian batches' (mean-loss) Hessians."""
    total = [torch.zeros_like(t) for t in vector]
    for batch in hessian_batches:
        for acc, h in zip(total, hessian_vector_product(model, batch, vector)):
            acc.add_(h, alpha=1.0 / len(hessian_batches))
    return total


def inverse_hvp(model: nn.Module, vector: list[torch.Tensor], hessian_batches: Sequence[Batch],
                *, damping: float = 0.01, scale: float | None = None, depth: int = 100,
                repeats: int = 1, seed: int = 0, tol: float = 1e-4, progress: bool = False,
                info: dict | None = None) -> list[torch.Tensor]:
    """LiSSA estimate of ``(H + damping I)^{-1} vector`` (see module docstring).

    ``scale=None``: 1.5 x (the largest one-batch Hessian eigenvalue, :func:`top_eigenvalue`,
    + ``damping``). Each recursion stops after ``depth`` steps, or earlier once a step changes
    the estimate by less than ``tol`` (relative). Raises :class:`LissaDivergedError` when the
    recursion blows up (a ``scale`` below the top eigenvalue, or negative curvature larger
    than ``damping``). ``info``, if given, receives ``scale``, ``top_eigenvalue``, ``steps``
    (per repeat) and ``residual`` = ``|(H + damping I) s - vector| / |vector|`` with ``H`` the
    mean Hessian of the batches (one more HVP per batch): how far the estimate is from the
    exact solve.
    """
    # kept whole (~60+ lines): the LiSSA recursion with its convergence and divergence checks,
    # in one loop
    batches = list(hessian_batches)
    if not batches:
        raise ValueError("lissa needs at least one Hessian batch")
    if (scale is not None and scale <= 0) or depth < 0 or repeats < 1 or damping < 0:
        raise ValueError(f"lissa needs scale > 0 (or None), depth >= 0, repeats >= 1, "
                         f"damping >= 0; got scale={scale}, depth={depth}, repeats={repeats}, "
                         f"damping={damping}")
    info = {} if info is None else info
    if scale is None:
        info["top_eigenvalue"] = top_eigenvalue(model, batches, seed=seed)
        scale = 1.5 * (info["top_eigenvalue"] + damping)
        if scale <= 0:
            scale = 1.0  # a zero Hessian and no damping: any scale works
    info["scale"] = scale
    v = [t.detach() for t in vector]
    v_norm = _norm(v)
    gen = torch.Generator().manual_seed(int(seed))
    result = [torch.zeros_like(t) for t in v]
    info["steps"] = []
    bar = tqdm(total=depth * repeats, desc="LiSSA", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for _ in range(repeats):
            h = [t.clone() for t in v]
            order: list[int] = []
            steps = 0
            for step in range(depth):
                if not order:
                    order = torch.randperm(len(batches), generator=gen).tolist()
                hv = hessian_vector_product(model, batches[order.pop(0)], h)
                # h <- v + h - (H h + damping h) / scale
                new = [vi + hi * (1.0 - damping / scale) - hvi / scale
                       for vi, hi, hvi in zip(v, h, hv)]
                change = _norm([a - b for a, b in zip(new, h)])
                h, steps = new, step + 1
                bar.update(1)
                h_norm = _norm(h)
                if not math.isfinite(h_norm) or h_norm > DIVERGENCE * max(v_norm, 1e-300):
                    raise LissaDivergedError(
                        f"LiSSA recursion diverged at step {step + 1} (norm {h_norm:.3g} vs "
                        f"initial {v_norm:.3g}) with scale {scale:.4g} and damping {damping}: "
                        "the Hessian has directions the recursion cannot invert; raise "
                        "damping (estimator.damping) above its negative curvature, or scale "
                        "(estimator.lissa_scale) above its largest eigenvalue")
                bar.set_postfix(change=f"{change / max(h_norm, 1e-300):.1e}")
                if change <= tol * h_norm:
                    break
            info["steps"].append(steps)
            for acc, hi in zip(result, h):
                acc.add_(hi, alpha=1.0 / (scale * repeats))
    finally:
        bar.close()
    hs = mean_hvp(model, batches, result)
    info["residual"] = _norm([a + damping * r - b for a, r, b in zip(hs, result, v)]) / \
        max(v_norm, 1e-300)
    return result


def lissa_values(model: nn.Module, train_batches: Sequence[Batch], val_batches: Sequence[Batch],
                 hessian_batches: Sequence[Batch], *, damping: float = 0.01,
                 scale: float | None = None, depth: int = 100, repeats: int = 1, seed: int = 0,
                 tol: float = 1e-4, progress: bool = False,
                 info: dict | None = None) -> torch.Tensor:
    """``[N_train]`` LiSSA values ``g_V^T (H + damping I)^{-1} g_j`` (positive = helps), in
    the order of ``train_batches``; see the module docstring and :func:`inverse_hvp` (the
    scale from the data when None, the stop on convergence, ``info`` with the residual).

    ``train_batches``, ``val_batches``, ``hessian_batches``: re-iterable sequences of
    :class:`~lai.batching.Batch` on the model's device. The model's current mode is used;
    parameters and buffers are left unchanged. Raises :class:`LissaDivergedError` if the
    recursion diverges.
    """
    g_v = total_validation_gradient(model, val_batches)
    s = inverse_hvp(model, g_v, hessian_batches, damping=damping, scale=scale, depth=depth,
                    repeats=repeats, seed=seed, tol=tol, progress=progress, info=info)
    return directional_values(model, train_batches, s)


@dataclass
class LissaOptions(StaticOptions):
    """``estimator=lissa`` (runner=two_round)."""

    name: str = "lissa"
    damping: float = 0.01  # lambda of H + lambda I
    lissa_scale: Optional[float] = None  # > the top eigenvalue of H + lambda I; None =
    # 1.5 x (a power-iteration estimate + lambda)
    lissa_depth: int = 100  # recursion steps
    lissa_repeats: int = 1  # independent repeats, averaged
    hessian_samples: int = 1000  # training samples the curvature is taken from

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.damping < 0:
            raise ValueError("estimator.damping must be >= 0")
        if not (self.lissa_depth >= 1 and self.lissa_repeats >= 1
                and (self.lissa_scale is None or self.lissa_scale > 0)):
            raise ValueError("estimator.lissa_depth/repeats/scale must be > 0")
        if self.hessian_samples < 1:
            raise ValueError("estimator.hessian_samples must be >= 1")

    def curvature_samples(self) -> int:
        return self.hessian_samples

    def keywords(self, seed: int, progress: bool, checkpoints: Any, info: dict) -> dict:
        """The keywords of :func:`lissa_values` for a run (its solve reported in ``info``)."""
        return {"damping": self.damping, "scale": self.lissa_scale, "depth": self.lissa_depth,
                "repeats": self.lissa_repeats, "seed": seed, "progress": progress,
                "info": info}


register_estimator("lissa", LissaOptions, kind="static")(lissa_values)
