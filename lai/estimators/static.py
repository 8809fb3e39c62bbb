"""Static estimators: score every training sample once, on a trained model.

Each is linear in the training gradient or (TRAK) in a projected margin gradient, so none
builds an N x P matrix of per-sample gradients. Values: positive = helps.

    ip       v_j = <g_V, g_j>                          (one backward over V + one forward-mode
                                                         pass over the training set)
    lissa    v_j = g_V^T (H + lambda I)^{-1} g_j       (LiSSA inverse-HVP, then as ip)
    datainf  v_j = sum_b g_{V,b}^T (H_b + lambda_b I)^{-1}_DataInf g_{j,b}
    trak     TRAK with the margin output function and a random projection

``static_values`` is what the two-round runner and :func:`lai.value` call.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lai.batching import Batch
from lai.estimators.ghost import directional_derivatives, trainable_parameters

STATIC = ("ip", "lissa", "datainf", "trak")


def _validation_gradient(model: nn.Module, val_batches: Sequence[Batch]) -> list[torch.Tensor]:
    from lai.estimators.ghost import validation_gradient

    total = None
    for vb in val_batches:
        g = validation_gradient(model, vb)
        total = g if total is None else [a + b for a, b in zip(total, g)]
    return total


def ip_values(model: nn.Module, train_batches: Sequence[Batch],
              val_batches: Sequence[Batch]) -> torch.Tensor:
    """``[N]`` static IP (Hessian-free influence) values ``<g_V, g_j>`` on the current model."""
    g_v = _validation_gradient(model, val_batches)
    return torch.cat([directional_derivatives(model, b, g_v) for b in train_batches])


def static_values(method: str, model: nn.Module, train_batches: Sequence[Batch],
                  val_batches: Sequence[Batch], hessian_batches: Sequence[Batch] | None = None,
                  **options: Any) -> torch.Tensor:
    """``[N]`` values of the training samples in ``train_batches`` (in order) by ``method``.

    ``hessian_batches``: the data the curvature is estimated from (lissa, datainf); default
    the training batches. ``options`` go to the method (see each module).
    """
    if method not in STATIC:
        raise ValueError(f"unknown static estimator {method!r}; available: {', '.join(STATIC)}")
    if not trainable_parameters(model):
        raise ValueError("the model has no trainable parameters")
    hessian_batches = list(hessian_batches) if hessian_batches is not None else list(train_batches)
    if method == "ip":
        if options:
            raise TypeError(f"ip takes no options, got {sorted(options)}")
        return ip_values(model, train_batches, val_batches)
    if method == "lissa":
        from lai.estimators.lissa import lissa_values

        return lissa_values(model, train_batches, val_batches, hessian_batches, **options)
    if method == "datainf":
        from lai.estimators.datainf import datainf_values

        return datainf_values(model, train_batches, val_batches, hessian_batches, **options)
    from lai.estimators.trak import trak_values

    return trak_values(model, train_batches, val_batches, **options)
