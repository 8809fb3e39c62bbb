"""Curate your own training loop: online valuation riding on your training forward.

    curator = lai.Curator(model, val_data, method="lai", policy="threshold")
    for epoch in range(epochs):
        for batch in train_loader:
            with curator.step(batch, epoch=epoch) as step:   # hooks ride on this forward
                outputs = model(**inputs)
            loss = step.loss(outputs)        # weighted mean of per-sample losses, kept rows
            loss.backward(); optimizer.step(); optimizer.zero_grad()
            log(step.values, step.keep)      # [B] values (positive = helps), keep decisions

One forward per step: the estimator's hooks (LAI, LLI, Ghost's forward form) ride on the
forward inside ``with``, the policy turns the values into weights when it closes, and
:meth:`CurationStep.loss` is the weighted mean of the per-sample losses. ``run.py``'s trainer
drives the same object (:class:`lai.train.loop.Trainer`), so the two curate identically.

What the trainer's config offers is here too:

- ``method``: ``lai`` | ``lli`` | ``ghost`` (``ghost_mode``: ``auto`` | ``forward`` |
  ``probe``) | ``vanilla``, or an :class:`~lai.estimators.base.OnlineEstimator`;
- ``policy``: a name of :data:`lai.policies.POLICIES` with its options as keywords
  (``threshold=``, ``keep_fraction=``, ...) and ``start_epoch`` (warm-up), or a
  :class:`~lai.policies.base.Policy`;
- the validation cache: rebuilt every ``refresh_every`` steps from a random ``val_fraction``
  (capped at ``val_max``) of ``val_data``, in ``val_mode``; ``self_influence=True`` values
  each batch against itself (no ``val_data``);
- ``strategy="two_pass"``: the forward inside ``with`` is a no-grad scoring pass and
  :attr:`CurationStep.kept_batch` is what to forward again for the loss (dropped samples
  cost no backward);
- ``optimizer=`` + ``precondition="adam"``: values in Adam's preconditioned space (App. E);
- Ghost's probe form (values after the backward, for a policy that keeps every sample):
  :attr:`CurationStep.values` is read after ``loss.backward()``;
- ``loss_fn(logits, labels) -> [B]``: another per-sample loss than cross-entropy (see
  :func:`lai.batching.using_loss`), for the values and for :meth:`CurationStep.loss`.

``val_data``: a batch (``(inputs, labels)``, a dict with ``labels``, a
:class:`~lai.batching.Batch`), a map-style dataset of ``(x, y)`` pairs or dicts (rows collated
with ``default_collate``), an object with ``__len__`` and ``gather(rows) -> Batch`` (the
trainer's splits), or an iterable of batches (a ``DataLoader``: each refresh takes the next
batch, ``val_fraction`` unused). Each draw is moved to the model's device. Token labels
follow ``lm_labels`` as in :func:`lai.value`.
"""
from __future__ import annotations

import itertools
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from lai.batching import (Batch, LossFn, as_batch, forward_logits, logits_of,
                          per_sample_loss, resolve_labels, using_loss)
from lai.estimators.base import OnlineEstimator, VanillaEstimator
from lai.estimators.capture import BufferSnapshot, preserved_buffers
from lai.policies.base import Policy

STRATEGIES = ("one_pass", "two_pass")


class ValidationSource:
    """Draws the validation batch of each cache refresh (see the module docstring)."""

    def __init__(self, data: Any, model: nn.Module, val_fraction: float = 0.1,
                 val_max: Optional[int] = None, seed: int = 0, lm_labels: str = "auto",
                 transform: Optional[Callable[[Batch], Batch]] = None,
                 shard: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        if not 0 < val_fraction <= 1:
            raise ValueError(f"val_fraction must be in (0, 1], got {val_fraction!r}")
        if val_max is not None and val_max < 1:
            raise ValueError(f"val_max must be >= 1, got {val_max!r}")
        self.data, self.model, self.lm_labels = data, model, lm_labels
        self.val_fraction, self.val_max = val_fraction, val_max
        self.gen = torch.Generator().manual_seed(seed)
        # default: on the model's device (a validation set kept on the host is common)
        device = next(model.parameters(), torch.empty(0)).device
        self.transform = transform or (lambda b: b.to(device))
        self.shard = shard or (lambda rows: rows)
        self._iter: Optional[Iterator] = None
        if hasattr(data, "gather") and hasattr(data, "__len__"):
            self.kind = "split"
        elif isinstance(data, (Batch, tuple, list)) or (hasattr(data, "keys")
                                                       and "labels" in data):
            self.kind = "batch"
            self.data = resolve_labels(model, data, as_batch(data), lm_labels)
        elif hasattr(data, "__iter__") and not hasattr(data, "__getitem__"):
            self.kind = "loader"
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.kind = "dataset"  # map-style: rows collated as a DataLoader would
        elif hasattr(data, "__iter__"):
            self.kind = "loader"
        else:
            raise TypeError(f"val_data must be a batch, a dataset, a split with gather(rows), "
                            f"or an iterable of batches; got {type(data).__name__}")

    def _rows(self, n: int) -> torch.Tensor:
        k = max(1, int(round(self.val_fraction * n)))
        if self.val_max is not None:
            k = min(k, int(self.val_max))
        rows = self.shard(torch.randperm(n, generator=self.gen)[:k])
        if len(rows) == 0:
            raise ValueError(f"{k} validation rows per refresh cannot be shared by the "
                             "data-parallel ranks: raise val_fraction / val_max")
        return rows

    def draw(self) -> Batch:
        """The next validation batch (labels aligned with the logits)."""
        if self.kind == "split":
            batch = self.data.gather(self._rows(len(self.data)))
        elif self.kind == "batch":
            batch = self.data.select(self._rows(len(self.data)))
        elif self.kind == "dataset":
            from torch.utils.data import default_collate

            raw = default_collate([self.data[int(i)] for i in self._rows(len(self.data))])
            batch = resolve_labels(self.model, raw, as_batch(raw), self.lm_labels)
        else:
            if self._iter is None:
                self._iter = itertools.cycle(self.data) if isinstance(self.data, (list,)) \
                    else iter(self.data)
            try:
                raw = next(self._iter)
            except StopIteration:  # a DataLoader: start it again
                self._iter = iter(self.data)
                raw = next(self._iter)
            batch = resolve_labels(self.model, raw, as_batch(raw), self.lm_labels)
        return self.transform(batch)


class Curator:
    """Online valuation and curation for any training loop; see the module docstring.

    ``forward_context``: a zero-argument factory of the context the estimator's own forwards
    run in (e.g. bf16 autocast). ``refresh_context``: one that wraps each cache refresh
    (the trainer times it). ``after_refresh(estimator)``: called after each refresh (the
    trainer sums data-parallel ranks' caches there). ``val_transform(batch) -> batch``: applied
    to each validation draw (device, preprocessing).
    """

    def __init__(self, model: nn.Module, val_data: Any = None, method: Any = "lai",
                 policy: Any = "threshold", *, val_fraction: float = 0.1,
                 val_max: Optional[int] = None, refresh_every: int = 1, val_mode: str = "eval",
                 self_influence: bool = False, strategy: str = "one_pass",
                 optimizer: Optional[torch.optim.Optimizer] = None, precondition: str = "none",
                 seed: int = 0, lm_labels: str = "auto", start_epoch: int = 0,
                 forward_context: Callable[[], AbstractContextManager] = nullcontext,
                 refresh_context: Callable[[], AbstractContextManager] = nullcontext,
                 after_refresh: Optional[Callable[[OnlineEstimator], None]] = None,
                 val_transform: Optional[Callable[[Batch], Batch]] = None,
                 shard: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 policy_options: Optional[dict] = None, loss_fn: Optional[LossFn] = None,
                 **estimator_options: Any):
        from lai.estimators.registry import build_estimator
        from lai.policies.registry import build_policy

        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of: {', '.join(STRATEGIES)}")
        if val_mode not in ("eval", "train"):
            raise ValueError(f"val_mode={val_mode!r} is not one of: eval, train")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.est = (method if isinstance(method, OnlineEstimator)
                    else build_estimator(str(method).lower(), **estimator_options))
        if isinstance(method, OnlineEstimator) and estimator_options:
            raise TypeError(f"estimator options {sorted(estimator_options)} given with an "
                            "estimator object; set them on the object")
        self.policy = (policy if isinstance(policy, Policy)
                       else build_policy(str(policy), start_epoch=start_epoch,
                                         **(policy_options or {})))
        self.scoring = not isinstance(self.est, VanillaEstimator)
        self.own_values = not self.scoring and not self.policy.needs_values
        self.self_influence = bool(self_influence)
        if self.self_influence and val_data is not None:
            raise ValueError("self_influence values each batch against itself: give no "
                             "val_data")
        needs_val = self.scoring and not self.self_influence and self.est.needs_validation
        if needs_val and val_data is None:
            raise ValueError(f"method {self.est.name!r} needs val_data (or "
                             "self_influence=True)")
        self.val = (ValidationSource(val_data, model, val_fraction, val_max, seed, lm_labels,
                                     val_transform, shard) if needs_val else None)
        self.periodic = needs_val
        self.refresh_every, self.val_mode = int(refresh_every), val_mode
        self.strategy, self.lm_labels = strategy, lm_labels
        self.forward_context, self.refresh_context = forward_context, refresh_context
        self.after_refresh = after_refresh
        self.est.forward_context = forward_context
        self.steps = 0  # steps started through step()
        self.cache_ready = False  # a cache exists in this process
        self.last_val_batch: Optional[Batch] = None
        # copies of the model's buffers, reused by the no-grad scoring forwards (two_pass)
        self.buffer_snapshot = BufferSnapshot(
            host=next(model.parameters(), torch.empty(0)).device.type != "cpu")
        if optimizer is not None:
            self.bind_optimizer(optimizer, precondition)
        elif precondition != "none":
            raise ValueError("precondition='adam' reads the optimizer's state: pass optimizer=")
        self._plan()

    # ---- set-up ------------------------------------------------------------------------
    def _plan(self) -> None:
        plan_estimator(self.est, self.model, self.strategy, self.policy)

    def bind_optimizer(self, optimizer: torch.optim.Optimizer, precondition: str) -> None:
        """Score in the optimizer's preconditioned space (``precondition="adam"``)."""
        if precondition not in ("none", "adam"):
            raise ValueError(f"precondition={precondition!r} is not one of: none, adam")
        self.est.bind_optimizer(self.model, optimizer, precondition)

    # ---- the validation cache ----------------------------------------------------------
    def refresh(self, batch: Optional[Batch] = None) -> None:
        """Rebuild the cache from ``batch`` (default: the next validation draw), with the
        model in ``val_mode``; its mode and buffers are restored."""
        with self.refresh_context(), using_loss(self.loss_fn):
            vb = batch if batch is not None else self.val.draw()
            self.last_val_batch = vb  # what the cache was built from (for logs and checks)
            was_training = self.model.training
            self.model.train(self.val_mode == "train")
            try:
                self.est.refresh(self.model, vb)  # buffers (BN statistics) restored inside
                if self.after_refresh is not None:
                    self.after_refresh(self.est)
            finally:
                self.model.train(was_training)
        self.cache_ready = True

    def refresh_if_due(self, step: int, epoch: int) -> bool:
        """Refresh when step ``step`` of ``epoch`` scores and the cache is due (every
        ``refresh_every`` steps, and at the first scored step of a process). True if it did."""
        if self.periodic and self.policy.active(epoch) and (
                step % self.refresh_every == 0 or not self.cache_ready):
            self.refresh()
            return True
        return False

    @torch.no_grad()
    def score(self, batch: Any) -> torch.Tensor:
        """``[B]`` values of ``batch`` against the current cache without training on it: a
        no-grad forward with the estimator's hooks, the model's buffers restored (e.g. to log
        the values of held-out data). Needs a cache (:meth:`refresh`)."""
        if not self.scoring:
            raise ValueError(f"method {self.est.name!r} gives no values")
        b = batch if isinstance(batch, Batch) else resolve_labels(
            self.model, batch, as_batch(batch), self.lm_labels)
        with preserved_buffers(self.model, self.buffer_snapshot), using_loss(self.loss_fn):
            with self.est.capture(self.model, b) as cap:
                with self.forward_context():
                    forward_logits(self.model, b.inputs)
            return self.est.score(cap)

    # ---- one step --------------------------------------------------------------------------
    def step(self, batch: Any, epoch: int = 0, step: Optional[int] = None,
             refresh: bool = True) -> "CurationStep":
        """The curation of one training batch: use as ``with curator.step(batch) as s:`` around
        the training forward. ``step``: the global step index (default: steps started so far);
        ``refresh=False`` leaves the periodic refresh to the caller (:meth:`refresh_if_due`)."""
        index = self.steps if step is None else int(step)
        self.steps = index + 1
        b = batch if isinstance(batch, Batch) else resolve_labels(
            self.model, batch, as_batch(batch), self.lm_labels)
        score_now = (self.scoring or self.own_values) and self.policy.active(epoch)
        if score_now and self.scoring and not self.self_influence and refresh:
            self.refresh_if_due(index, epoch)
        if score_now and self.self_influence:
            self.refresh(b)
        return CurationStep(self, b, epoch, index, score_now)


def plan_estimator(est: OnlineEstimator, model: nn.Module, strategy: str,
                   policy: Policy) -> None:
    """Let ``est`` settle its form for training ``model`` with ``strategy`` and ``policy``
    (Ghost: the probe form when values may come after the backward, i.e. one pass and a
    policy keeping every sample, else the forward form), planned in train mode, the mode
    the steps run in (train-mode BatchNorm couples samples); the model's mode is restored.
    A ValueError when they cannot go together."""
    was_training = model.training
    model.train()
    try:
        est.plan(model, values_before_backward=not (
            strategy == "one_pass" and policy.keeps_all_unweighted))
    finally:
        model.train(was_training)


class CurationStep:
    """One step's curation (made by :meth:`Curator.step`).

    Inside ``with``: run the training forward (of :attr:`batch`'s inputs). After it:
    :attr:`values` ``[B]`` (positive = helps; None when not scored), :attr:`weights` ``[B]``
    float32 (None: every sample, weight 1), :attr:`keep` ``[B]`` bool. Ghost's probe form:
    :attr:`values` exists only after the backward of :meth:`loss`.
    """

    def __init__(self, curator: Curator, batch: Batch, epoch: int, index: int,
                 score_now: bool):
        self.curator, self.batch, self.epoch, self.index = curator, batch, epoch, index
        self.scored = score_now
        est = curator.est
        self.late = score_now and curator.scoring and est.scores_after_backward
        self.two_pass = score_now and curator.scoring and curator.strategy == "two_pass"
        # the forward inside `with` carries the estimator's hooks
        self.hooked = score_now and curator.scoring
        self._values: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None
        self.keep: Optional[torch.Tensor] = None
        self._outer = ExitStack()
        self._capture: Any = None
        self._cap: Any = None
        self._row_scale: Any = None

    # ---- the forward ---------------------------------------------------------------------
    def __enter__(self) -> "CurationStep":
        if not self.hooked:
            return self
        c = self.curator
        self._outer = ExitStack()
        if self.two_pass:  # a no-grad scoring pass; the model's buffers restored after it
            self._outer.enter_context(torch.no_grad())
            self._outer.enter_context(preserved_buffers(c.model, c.buffer_snapshot))
        try:
            self._capture = c.est.capture(c.model, self.batch)
            self._cap = self._capture.__enter__()
        except BaseException:
            self._outer.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        c = self.curator
        if not self.hooked:
            if exc_type is None and self.scored and c.own_values:
                device = self.batch.labels.device
                self._set_values(c.policy.own_values(len(self.batch), self.index, device))
            return
        try:
            with using_loss(c.loss_fn):  # Ghost's forward form reads the loss at its exit
                self._capture.__exit__(exc_type, exc, tb)
                if exc_type is None and not self.late:  # the probe form's: after backward
                    self._set_values(c.est.score(self._cap))
        finally:
            self._outer.__exit__(None, None, None)

    def _set_values(self, values: torch.Tensor) -> None:
        self._values = values
        self.weights = self.curator.policy.select(values, self.index, self.epoch)
        self.keep = self.weights > 0

    # ---- the loss ------------------------------------------------------------------------
    def losses(self, outputs: Any, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N]`` per-sample losses of ``outputs`` (a model output or logits) against
        ``labels`` (default: the batch's; the kept rows' for a second pass's outputs)."""
        logits = logits_of(outputs)
        if labels is None:
            labels = self.batch.labels
            if self.two_pass and self.kept_rows is not None and \
                    logits.shape[0] == len(self.kept_rows):
                labels = labels[self.kept_rows.to(labels.device)]
        with using_loss(self.curator.loss_fn):
            return per_sample_loss(logits.float(), labels)

    def loss(self, outputs: Any) -> torch.Tensor:
        """The weighted mean of the per-sample losses over the kept rows (the plain mean when
        every sample has weight 1): the scalar to back-propagate. In two-pass, ``outputs`` are
        those of :attr:`kept_batch`'s forward. A batch with nothing kept gives 0 (with a
        graph, so ``backward`` works and changes nothing)."""
        losses = self.losses(outputs)
        w = self.weights
        if w is not None and self.two_pass and self.kept_rows is not None:
            w = w[self.kept_rows]
        if w is None or self.late:
            self._row_scale = 1.0 / max(1, losses.shape[0])
            return losses.mean()
        denom = w.sum()
        return (w * losses).sum() / denom.clamp_min(torch.finfo(w.dtype).tiny)

    def set_row_scale(self, coef: Any) -> None:
        """For a caller that builds its own loss (data-parallel): each sample's coefficient in
        the back-propagated loss, which Ghost's probe form needs to read its values."""
        self._row_scale = coef

    @property
    def values(self) -> Optional[torch.Tensor]:
        """``[B]`` values (positive = helps); for Ghost's probe form, after the backward."""
        if self._values is None and self.late and self._cap is not None:
            if self._row_scale is None:
                raise RuntimeError("Ghost's probe form gives values after the backward of "
                                   "step.loss(outputs)")
            self._cap.row_scale = self._row_scale
            with using_loss(self.curator.loss_fn):
                values = self.curator.est.score(self._cap)
            self._values = values
            self.keep = torch.ones(len(values), dtype=torch.bool, device=values.device)
        return self._values

    # ---- two pass ----------------------------------------------------------------------
    @property
    def kept_rows(self) -> Optional[torch.Tensor]:
        """Indices of the kept rows in increasing order; None = every row (two pass)."""
        if not hasattr(self, "_kept_rows"):
            self._kept_rows = None if self.keep is None else kept_rows(self.keep,
                                                                       self.curator.policy)
        return self._kept_rows

    @property
    def kept_batch(self) -> Batch:
        """The sub-batch to forward again for the loss (two pass): the kept rows."""
        rows = self.kept_rows
        return self.batch if rows is None else self.batch.select(rows)


def kept_rows(keep: torch.Tensor, policy: Policy) -> Optional[torch.Tensor]:
    """Indices of the kept rows (``keep [B]`` bool) in increasing order; None = every row.

    With a count fixed by the policy (e.g. percentile) they are found on the device: a stable
    descending sort of the 0/1 mask puts the kept rows first, in order. Otherwise ``nonzero``
    waits for the device once: the count decides the shapes of the next pass.
    """
    b = keep.shape[0]
    n = policy.fixed_kept(b)
    if n is None:
        rows = keep.nonzero().squeeze(1)
        return None if rows.numel() == b else rows
    if n >= b:
        return None
    return torch.sort(keep.to(torch.int8), descending=True, stable=True).indices[:n]
