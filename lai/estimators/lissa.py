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
``H_t + lambda I``; its error shrinks like ``(1 - (mu_min + lambda)/scale)^depth``.
``repeats`` independent recursions (different orders) are averaged. Then every ``v_j`` is
the exact directional derivative ``<s, grad ell_j>`` (one forward-mode pass per training
batch, :func:`lai.estimators.ghost.directional_derivatives`): no per-sample gradient is ever
formed.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import nn

from lai.batching import Batch, forward_logits, per_sample_loss
from lai.estimators.capture import preserved_buffers
from lai.estimators.ghost import directional_derivatives, trainable_parameters, \
    validation_gradient

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
    with preserved_buffers(model), torch.enable_grad():
        loss = per_sample_loss(forward_logits(model, batch.inputs), batch.labels).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = [torch.zeros_like(v) for v in vector]
        if used:
            hv = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                     grad_outputs=[vector[i].to(params[i].dtype) for i in used],
                                     allow_unused=True)
            for i, h in zip(used, hv):
                if h is not None:
                    out[i] = h.detach().to(vector[i].dtype)
    return out


def inverse_hvp(model: nn.Module, vector: list[torch.Tensor], hessian_batches: Sequence[Batch],
                *, damping: float = 0.01, scale: float = 10.0, depth: int = 100,
                repeats: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """LiSSA estimate of ``(H + damping I)^{-1} vector`` (see module docstring)."""
    batches = list(hessian_batches)
    if not batches:
        raise ValueError("lissa needs at least one Hessian batch")
    if scale <= 0 or depth < 0 or repeats < 1:
        raise ValueError(f"lissa needs scale > 0, depth >= 0, repeats >= 1; got scale={scale}, "
                         f"depth={depth}, repeats={repeats}")
    v = [t.detach() for t in vector]
    v_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in v))
    gen = torch.Generator().manual_seed(int(seed))
    result = [torch.zeros_like(t) for t in v]
    for _ in range(repeats):
        h = [t.clone() for t in v]
        order: list[int] = []
        for step in range(depth):
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            hv = hessian_vector_product(model, batches[order.pop(0)], h)
            # h <- v + h - (H h + damping h) / scale
            h = [vi + hi * (1.0 - damping / scale) - hvi / scale
                 for vi, hi, hvi in zip(v, h, hv)]
            h_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in h))
            if not math.isfinite(h_norm) or h_norm > DIVERGENCE * max(v_norm, 1e-300):
                warnings.warn(
                    f"LiSSA recursion diverged at step {step + 1} (norm {h_norm:.3g} vs "
                    f"initial {v_norm:.3g}): increase `scale` (now {scale}) above the largest "
                    "Hessian eigenvalue, or increase `damping`", RuntimeWarning, stacklevel=3)
                break
        for acc, hi in zip(result, h):
            acc.add_(hi, alpha=1.0 / (scale * repeats))
    return result


def lissa_values(model: nn.Module, train_batches: Sequence[Batch], val_batches: Sequence[Batch],
                 hessian_batches: Sequence[Batch], *, damping: float = 0.01, scale: float = 10.0,
                 depth: int = 100, repeats: int = 1, seed: int = 0) -> torch.Tensor:
    """``[N_train]`` LiSSA values ``g_V^T (H + damping I)^{-1} g_j`` (positive = helps), in
    the order of ``train_batches``; see the module docstring.

    ``train_batches``, ``val_batches``, ``hessian_batches``: re-iterable sequences of
    :class:`~lai.batching.Batch` on the model's device. The model's current mode is used;
    parameters and buffers are left unchanged. A ``RuntimeWarning`` is issued if the
    recursion diverges (then increase ``scale``).
    """
    g_v = total_validation_gradient(model, val_batches)
    s = inverse_hvp(model, g_v, hessian_batches, damping=damping, scale=scale, depth=depth,
                    repeats=repeats, seed=seed)
    values = [directional_derivatives(model, batch, s) for batch in train_batches]
    if not values:
        return torch.zeros(0)
    return torch.cat(values)
