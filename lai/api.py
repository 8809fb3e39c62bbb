"""The one-call entry points for users who bring their own model."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lai.batching import (Batch, LossFn, as_batch, forward_logits, resolve_labels,
                          using_loss)
from lai.estimators.capture import preserved_buffers
from lai.estimators.online.ghost import ghost_pairwise
from lai.estimators.online.ghost_flat import flattened_ghost_values
from lai.estimators.registry import (ESTIMATORS, OnlineOptions, build_estimator,
                                     static_names)
from lai.estimators.static import static_values


def online_methods() -> tuple[str, ...]:
    """The registered online estimators that value samples against validation data (not
    ``vanilla`` or ``spl``, which value nothing)."""
    return tuple(e.name for e in ESTIMATORS if e.kind == "online"
                 and issubclass(e.options, OnlineOptions))


def value(model: nn.Module, train_batch: Any, val_batch: Any, method: str = "lai", *,
          output_layer: str | None = None, layers: str | Sequence[str] | None = None,
          cache: str = "auto", chunk_size: int = 512, hessian_batch: Any = None,
          lm_labels: str = "auto", loss_fn: LossFn | None = None,
          **options: Any) -> torch.Tensor:
    """Value of every sample of ``train_batch`` against ``val_batch``.

    Returns a float tensor ``[len(train_batch)]`` (float64 if the model is float64).
    **Sign: positive = helps**, i.e. the first-order decrease of the summed validation loss
    when one SGD step is taken on that sample (Koh–Liang influence is the negative).

    Batches are ``(inputs, targets)`` tuples or dicts of model keyword arguments with a
    ``labels`` key (Hugging Face style); model outputs may be tensors or have ``.logits``.
    The loss is per-sample cross-entropy (for token labels: the mean over a sample's labelled
    positions). Token labels ``[B, T]`` follow ``lm_labels``
    (:func:`lai.batching.resolve_labels`): by default Hugging Face's convention for a Hugging
    Face causal LM (labels = input ids, shifted inside; ``-100`` ignored), aligned with the
    logits for other Hugging Face models and for a :class:`lai.batching.Batch`, and an error
    asking which for any other model. The model is scored in its current mode
    (train/eval); its parameters and buffers are left exactly as they were.

    Methods:
      - ``"lai"``: ``v_j = sum_{z in V} sum_l <phi_l(z), phi_l(j)> <G_z, G_j>`` over every
        layer that is a linear map of its input (``nn.Linear``, ``nn.Conv1d/2d/3d``, Hugging
        Face's ``Conv1D``; ``layers=`` picks another set: ``code``, ``lli``, or
        module names); ``phi_l`` = the layer's input flattened with padded positions zeroed,
        ``G_x = d ell_x / d logits_x``;
      - ``"lli"``: the output layer's term only (output layer = last ``nn.Linear`` unless
        ``output_layer=`` names another);
      - ``"ghost"``: ``v_j = <sum_{z in V} grad ell_z, grad ell_j>`` over all trainable
        parameters, exact (forward-mode directional derivatives; no per-sample gradients).
    ``cache``: ``auto`` | ``folded`` | ``pairwise`` for lai/lli (equal results; a speed choice).
      - ``"ghost_flat"``: Ghost as the paper's public code computes it, from flattened
        whole-layer activations and output gradients of the Linear/Conv2d layers
        (:mod:`lai.estimators.online.ghost_flat`): exact on an MLP, an approximation for
        convolutions and token sequences; kept for comparison (Figure 1).

    Static methods (normally run on a trained model, see ``runner=two_round``):
      - ``"ip"``: ``<g_V, g_j>`` (same as ghost; the name of the two-round baseline);
      - ``"lissa"`` (``damping``, ``scale``, ``depth``, ``repeats``):
        ``g_V^T (H + damping I)^{-1} g_j``, H the mean Hessian of ell over ``hessian_batch``;
      - ``"datainf"`` (``damping``): DataInf's block-wise closed-form inverse;
      - ``"trak"`` (``proj_dim``, ``checkpoints``, ``damping``): TRAK, margin output function.
    ``hessian_batch``: a batch or an iterable of batches the curvature is estimated from
    (default ``train_batch``).

    ``loss_fn(logits, labels) -> [B]``: another per-sample loss than cross-entropy (MSE for
    regression, label smoothing, multi-label BCE, ...); each sample's loss must depend on
    its own row of the outputs only. Its output gradient is taken by autograd.
    """
    method = _method_name(method, (*online_methods(), "ghost_flat", *static_names()))
    with using_loss(loss_fn):
        return _value(model, train_batch, val_batch, method, output_layer, layers, cache,
                      chunk_size, hessian_batch, lm_labels, options)


def _value(model: nn.Module, train_batch: Any, val_batch: Any, method: str,
           output_layer: str | None, layers: Any, cache: str, chunk_size: int,
           hessian_batch: Any, lm_labels: str, options: dict) -> torch.Tensor:

    def batch(raw: Any) -> Batch:
        return resolve_labels(model, raw, as_batch(raw), lm_labels)

    if method in static_names():
        if hessian_batch is None:
            hessians = None
        elif isinstance(hessian_batch, (tuple, dict)) or hasattr(hessian_batch, "labels"):
            hessians = [batch(hessian_batch)]
        else:
            hessians = [batch(b) for b in hessian_batch]
        with preserved_buffers(model):
            return static_values(method, model, [batch(train_batch)], [batch(val_batch)],
                                 hessians, **options)
    if method == "ghost_flat":
        if options:
            raise TypeError(f"method 'ghost_flat' takes no options {sorted(options)}")
        return flattened_ghost_values(model, batch(train_batch), batch(val_batch))
    train, val = batch(train_batch), batch(val_batch)
    est = build_estimator(method, **_given(layers=layers, output_layer=output_layer,
                                           cache=cache, chunk_size=chunk_size), **options)
    with torch.no_grad(), preserved_buffers(model):
        est.refresh(model, val)
        with est.capture(model, train) as cap:
            forward_logits(model, train.inputs)
        return est.score(cap)


def pairwise(model: nn.Module, train_batch: Any, val_batch: Any, method: str = "ghost", *,
             output_layer: str | None = None, layers: str | Sequence[str] | None = None,
             lm_labels: str = "auto", loss_fn: LossFn | None = None) -> torch.Tensor:
    """``[len(train_batch), len(val_batch)]``: the value of each training sample against each
    validation sample (positive = helps); each row sums to :func:`value` of that sample.

    ``ghost``: ``<grad ell_z, grad ell_j>`` over all trainable parameters (one forward-mode
    pass per validation sample); ``lai``/``lli``: the per-pair terms of their sums. Token
    labels and ``loss_fn`` as in :func:`value`.
    """
    method = _method_name(method, online_methods())
    train = resolve_labels(model, train_batch, as_batch(train_batch), lm_labels)
    val = resolve_labels(model, val_batch, as_batch(val_batch), lm_labels)
    with using_loss(loss_fn):
        if method == "ghost":
            return ghost_pairwise(model, train, val)
        est = build_estimator(method, cache="pairwise",
                              **_given(layers=layers, output_layer=output_layer))
        with torch.no_grad(), preserved_buffers(model):
            est.refresh(model, val)
            with est.capture(model, train) as cap:
                forward_logits(model, train.inputs)
            return est.pairwise(cap)


def _method_name(method: str, allowed: Sequence[str]) -> str:
    """``method`` in lower case if it is one of ``allowed``; else a ValueError that lists
    exactly those (``vanilla`` and ``spl`` value nothing: they are training choices)."""
    name = str(method).lower()
    if name in allowed:
        return name
    hint = (" ('vanilla' and 'spl' are training settings of run.py, not valuation methods)"
            if name in ("vanilla", "spl") else "")
    raise ValueError(f"unknown method {method!r}; this function takes: {', '.join(allowed)}"
                     f"{hint}")


_DEFAULTS = {"layers": None, "output_layer": None, "cache": "auto", "chunk_size": 512}


def _given(**values: Any) -> dict:
    """The options a caller changed from :data:`_DEFAULTS` (this module's keyword defaults).
    Options left at their defaults are not passed on, so an estimator without them (Ghost
    has no ``layers``) is not handed keys it refuses."""
    return {k: v for k, v in values.items() if v is not _DEFAULTS[k] and v != _DEFAULTS[k]}
