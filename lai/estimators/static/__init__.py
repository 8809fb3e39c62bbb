"""Static estimators: score every training sample once, on a trained model.

Each is linear in the training gradient or (TRAK) in a projected margin gradient, so none
builds an N x P matrix of per-sample gradients. Values: positive = helps.

    ip       v_j = <g_V, g_j>                          (one backward over V + one forward-mode
                                                         pass over the training set)
    lissa    v_j = g_V^T (H + lambda I)^{-1} g_j       (LiSSA inverse-HVP, then as ip)
    datainf  v_j = sum_b g_{V,b}^T (H_b + lambda_b I)^{-1}_DataInf g_{j,b}
    trak     TRAK with the margin output function and a random projection

``static_values`` is what the two-round runner and :func:`lai.value` call. Each method
registers its values function and options dataclass in its own module.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from lai.batching import Batch
from lai.estimators.online.ghost import directional_derivatives, trainable_parameters
from lai.estimators.registry import (ESTIMATORS, StaticOptions, register_estimator,
                                     static_names)


def directional_values(model: nn.Module, train_batches: Sequence[Batch],
                       direction: list[torch.Tensor]) -> torch.Tensor:
    """``[N]``: ``<direction, grad ell_j>`` for every sample of ``train_batches`` in order
    (``[0]`` when there are none): what every static method linear in the training gradient
    computes once it has its direction."""
    values = [directional_derivatives(model, batch, direction) for batch in train_batches]
    return torch.cat(values) if values else torch.zeros(0)


def ip_values(model: nn.Module, train_batches: Sequence[Batch],
              val_batches: Sequence[Batch], hessian_batches: Sequence[Batch] | None = None
              ) -> torch.Tensor:
    """``[N]`` static IP (Hessian-free influence) values ``<g_V, g_j>`` on the current model
    (``hessian_batches`` unused: IP has no curvature)."""
    from lai.estimators.static.lissa import total_validation_gradient

    return directional_values(model, train_batches, total_validation_gradient(model,
                                                                              val_batches))


@dataclass
class IPOptions(StaticOptions):
    """``estimator=ip`` (runner=two_round): no options beyond the validation draw."""

    name: str = "ip"


register_estimator("ip", IPOptions, kind="static")(ip_values)


def static_values(method: str, model: nn.Module, train_batches: Sequence[Batch],
                  val_batches: Sequence[Batch], hessian_batches: Sequence[Batch] | None = None,
                  **options: Any) -> torch.Tensor:
    """``[N]`` values of the training samples in ``train_batches`` (in order) by ``method``
    (a static estimator of :data:`lai.estimators.registry.ESTIMATORS`).

    ``hessian_batches``: the data the curvature is estimated from (lissa, datainf); default
    the training batches. ``options`` go to the method's values function (see its module;
    each takes ``(model, train_batches, val_batches, hessian_batches, **options)``); one it
    does not take is a TypeError.
    """
    if method not in static_names():
        raise ValueError(f"unknown static estimator {method!r}; available: "
                         f"{', '.join(static_names())}")
    if not trainable_parameters(model):
        raise ValueError("the model has no trainable parameters")
    hessian_batches = list(hessian_batches) if hessian_batches is not None else list(train_batches)
    values = ESTIMATORS.get(method).build
    accepted = inspect.signature(values).parameters
    unknown = sorted(k for k in options if k not in accepted or k in (
        "model", "train_batches", "val_batches", "hessian_batches"))
    if unknown:
        raise TypeError(f"{method} takes no option(s) {', '.join(unknown)}")
    return values(model, train_batches, val_batches, hessian_batches, **options)
