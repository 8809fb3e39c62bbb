"""The estimator interfaces (docs/design.md §2) and the output-gradient helper they share.

Sign convention for every score returned here: **value** = the first-order decrease of the
validation loss when one SGD step is taken on the sample. Positive helps, negative hurts
(Koh–Liang influence is the negative of this).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import nn

from lai.batching import IGNORE_INDEX, Batch, custom_loss, per_sample_loss
from lai.estimators.registry import EstimatorOptions, register_estimator


def output_gradient(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``G = d ell_x / d logits_x`` per sample, flattened: ``[B, K]`` (K = C, or T*V for LM).

    ``ell`` is :func:`lai.batching.per_sample_loss` (cross-entropy unless another per-sample
    loss is set; then by autograd). Because
    ``ell_x`` depends only on sample x's logits, the gradient of the summed loss with respect
    to the logits gives every sample's own gradient at once; this costs a softmax, no backward
    through the network (for plain cross-entropy it equals ``softmax(logits) - onehot(y)``).
    """
    z = logits.detach().float() if logits.dtype not in (torch.float32, torch.float64) \
        else logits.detach()
    terms = label_terms(z, labels)
    if terms is not None:
        return cross_entropy_gradient(z, *terms).reshape(z.shape[0], -1)
    with torch.enable_grad():
        z = z.requires_grad_(True)
        (g,) = torch.autograd.grad(per_sample_loss(z, labels).sum(), z)
    return g.reshape(g.shape[0], -1)


def label_terms(z: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What :func:`cross_entropy_gradient` needs from the labels, for logits shaped like
    ``z``: ``(y, w)``, each ``[..., 1]`` (``[B, 1]`` for classification, ``[B, T, 1]`` for a
    language model): the target index (0 where ignored) and the weight of the position in
    the sample's loss (``1``; for an LM ``1 / labelled positions``, 0 where ignored). None
    where the closed form does not apply (soft or mis-shaped labels). Row ``j`` of each
    belongs to sample ``j``, so a block of samples can use a slice of them."""
    if custom_loss() is not None or not (z.dim() in (2, 3) and labels.shape == z.shape[:-1]
                                         and not labels.is_floating_point()):
        return None  # another loss than the default (lai.batching.using_loss): autograd
    valid = labels != IGNORE_INDEX
    y = labels.masked_fill(~valid, 0).unsqueeze(-1)
    dtype = torch.promote_types(z.dtype, torch.float32)  # bf16 logits: float32 weights
    w = valid.to(dtype)
    if z.dim() == 3:  # per-sample loss = mean over labelled positions
        w = w / valid.sum(1, keepdim=True).clamp_min(1).to(dtype)
    return y, w.unsqueeze(-1)


def cross_entropy_gradient(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``d ell_x / d z_x`` of :func:`per_sample_loss` in closed form, shaped like ``z``:
    ``(softmax(z) - onehot(y)) * w`` with ``(y, w)`` from :func:`label_terms` (positions
    labelled ``IGNORE_INDEX`` get 0). The same numbers as autograd through
    ``cross_entropy`` to float rounding, for a third of the kernels (a backward through
    ``log_softmax`` and ``nll_loss`` costs about three softmaxes)."""
    g = torch.softmax(z, -1)
    g.scatter_add_(-1, y, g.new_full(y.shape, -1.0))
    return g.mul_(w)


class OnlineEstimator(ABC):
    """Scores the samples of a training batch with the live model, against a validation cache.

    Use: ``refresh(model, val_batch)`` to rebuild the cache; then for a training batch
    ``with est.capture(model, batch) as cap: model forward`` and ``est.score(cap)``.

    Besides the three abstract methods, an estimator may override the optional capabilities
    below; the defaults are no-ops (or a clear refusal), so callers never probe for them.
    """

    name: str = "online"
    needs_validation: bool = True  # False: refresh() is never needed (e.g. SPL)
    # zero-argument factory of the context around the estimator's *own* forwards (the
    # validation-cache forward); the trainer sets bf16 autocast here with precision=bf16.
    # Everything after a forward (gradients, cache, values) runs outside it, in fp32.
    forward_context: Callable[[], AbstractContextManager] = nullcontext
    # True when reduce_cache() sums the validation cache over data-parallel ranks
    supports_data_parallel: bool = False

    @abstractmethod
    def refresh(self, model: nn.Module, val_batch: Batch) -> None:
        """Rebuild the validation cache from ``val_batch`` with the model in its current mode."""

    @abstractmethod
    def capture(self, model: nn.Module, batch: Batch) -> AbstractContextManager:
        """Hooks to hold during the training forward of ``batch``; yields a capture object."""

    @abstractmethod
    def score(self, capture: Any) -> torch.Tensor:
        """``[B]`` values of the captured batch, float32, positive = helps."""

    # ---- optional capabilities -----------------------------------------------------------
    @property
    def scores_after_backward(self) -> bool:
        """True when :meth:`score` must wait for the training backward (Ghost's probe form);
        the caller then sets ``capture.row_scale`` to each sample's loss coefficient."""
        return False

    def check_model(self, model: nn.Module) -> None:
        """Raise a one-line ValueError when the estimator's options do not fit ``model``
        (e.g. a layer name it does not have), before training. Default: nothing to check."""

    def plan(self, model: nn.Module, values_before_backward: bool) -> None:
        """Settle how to score ``model`` (in the mode it trains in), before the first step.
        ``values_before_backward``: the policy needs the values to weight the loss."""

    def bind_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                       precondition: str = "none") -> None:
        """Score in ``optimizer``'s preconditioned space (``precondition="adam"``). The
        default supports only ``"none"``: anything else is a ValueError."""
        if precondition != "none":
            raise ValueError(f"precondition={precondition!r} does not apply to estimator "
                             f"{self.name!r}")

    def prepare_data_parallel(self) -> None:
        """Make the cache summable over data-parallel ranks, before the first refresh; a
        ValueError when this estimator cannot run data-parallel."""
        if self.needs_validation and not self.supports_data_parallel:
            raise ValueError(f"estimator {self.name!r} has no data-parallel cache")

    def reduce_cache(self, sum_: Callable[[torch.Tensor], Any]) -> None:
        """Sum the validation cache over ranks in place, calling ``sum_`` (an all-reduce) on
        each cache tensor. Default: nothing to sum (no cache)."""
        if self.needs_validation:
            raise RuntimeError(f"estimator {self.name!r} has no data-parallel cache")


class VanillaEstimator(OnlineEstimator):
    """No scoring: plain training. ``score`` returns ``None``; the policy keeps everything."""

    name = "vanilla"
    needs_validation = False

    def refresh(self, model: nn.Module, val_batch: Batch) -> None:
        return None

    def capture(self, model: nn.Module, batch: Batch) -> AbstractContextManager:
        return nullcontext(None)

    def score(self, capture: Any) -> None:  # type: ignore[override]
        return None


@register_estimator("vanilla", EstimatorOptions)
def _build_vanilla(options: EstimatorOptions) -> VanillaEstimator:
    return VanillaEstimator()
