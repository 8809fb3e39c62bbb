"""The estimator registry: every estimator name, its options dataclass and its builder.

Online estimators register ``build(options) -> OnlineEstimator``; static ones register
``values(model, train_batches, val_batches, hessian_batches, **kwargs) -> [N]`` (the
function :func:`lai.value` and the two-round runner call) with ``meta["from_options"]``
mapping their options to its keywords. The built-in ones register in their own modules,
imported by ``lai/estimators/__init__.py``; see ``docs/extending.md`` for a new one.

The options dataclasses form a small hierarchy, whose fields are the config keys:

- :class:`EstimatorOptions`: ``name`` and the validation draw (``val_fraction``,
  ``val_max``); vanilla and SPL use it as it is;
- :class:`OnlineOptions`: + the online cache's schedule (``refresh_every``, ``val_mode``,
  ``self_influence``, ``precondition``): the online estimators that value samples;
- :class:`StaticOptions`: + what the two-round runner asks of a static method.

:meth:`EstimatorOptions.curation` gives the keywords of :class:`lai.curate.Curator` the
options set, :meth:`StaticOptions.curvature_samples` and
:meth:`StaticOptions.checkpoint_epochs` what the two-round runner needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from omegaconf import MISSING

from lai.plugins import Registry, options_from_config

ESTIMATORS: Registry = Registry("estimator", kinds=("online", "static"))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class EstimatorOptions:
    """Options every estimator has: its ``name`` and the validation draw it is scored
    against (ignored by those that use no validation data: vanilla, SPL; a dataset's config
    may set them for every estimator, e.g. digits draws its whole small split)."""

    name: str = MISSING
    val_fraction: float = 0.1  # fraction of the validation split drawn per cache build
    val_max: Optional[int] = None  # cap on the validation samples per draw

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction <= 1, "estimator.val_fraction must be in (0, 1]")
        _check(self.val_max is None or self.val_max >= 1, "estimator.val_max must be >= 1")

    def curation(self) -> dict:
        """The :class:`lai.curate.Curator` keywords these options set."""
        return {"val_fraction": self.val_fraction, "val_max": self.val_max}


@dataclass
class OnlineOptions(EstimatorOptions):
    """An online estimator with a validation cache rebuilt during training."""

    refresh_every: int = 1  # rebuild the validation cache every N optimizer steps
    val_mode: str = "eval"  # eval | train: module mode for the validation-cache forward
    self_influence: bool = False  # V = the current training batch (no validation set)
    precondition: str = "none"  # none | adam: score in Adam's preconditioned space (App. E)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.refresh_every >= 1, "estimator.refresh_every must be >= 1")
        _check(self.val_mode in ("eval", "train"),
               f"estimator.val_mode={self.val_mode!r} is not one of: eval, train")
        _check(self.precondition in ("none", "adam"),
               f"estimator.precondition={self.precondition!r} is not one of: none, adam")

    def curation(self) -> dict:
        return {**super().curation(), "refresh_every": self.refresh_every,
                "val_mode": self.val_mode, "self_influence": self.self_influence,
                "precondition": self.precondition}


@dataclass
class StaticOptions(EstimatorOptions):
    """A static estimator (two-round runner): scores every training sample once."""

    val_fraction: float = 1.0  # static methods score against the whole validation split

    def curvature_samples(self) -> int:
        """Training samples the curvature is estimated from (0: no curvature)."""
        return 0

    def checkpoint_epochs(self) -> int:
        """Round-1 checkpoints (the last epochs) the method reads besides the final model."""
        return 0

    def keywords(self, seed: int, progress: bool, checkpoints: Any, info: dict) -> dict:
        """The keywords of the registered values function for a run: ``seed``, whether to
        show ``progress``, the round-1 ``checkpoints`` (state dicts) and ``info``, a dict the
        method may report its solve into. Default: none."""
        return {}


def register_estimator(name: str, options: type, *, kind: str = "online",
                       **meta: Any) -> Callable:
    """Decorator registering an estimator (see the module docstring)."""
    return ESTIMATORS.register(name, options, kind=kind, **meta)


def online_names() -> tuple[str, ...]:
    return ESTIMATORS.names("online")


def static_names() -> tuple[str, ...]:
    return ESTIMATORS.names("static")


def estimator_options(name_or_node: Any, **values: Any) -> Any:
    """The options dataclass of an estimator: from a name and keyword values, or from a
    composed config node (``cfg.estimator``). Unknown keys: TypeError; bad values:
    ValueError."""
    if isinstance(name_or_node, str):
        return ESTIMATORS.options(name_or_node, **values)
    return options_from_config(name_or_node, ESTIMATORS)


def unsupported(method: str) -> ValueError:
    """A one-line error for an estimator name that is unknown or used in the wrong place."""
    online, static = ", ".join(online_names()), ", ".join(static_names())
    if method in static_names():
        return ValueError(f"estimator {method!r} is static (two-round): use runner=two_round, "
                          f"or lai.value(..., method={method!r}); online ones: {online}")
    return ValueError(f"unknown estimator {method!r}; online: {online}; static: {static}")


def build_estimator(method: Any, **options: Any):
    """An online estimator by name with its options as keywords (or from an options
    dataclass instance). An option the estimator does not have is a TypeError."""
    opts = method if not isinstance(method, str) else None
    name = method if opts is None else opts.name
    if name not in online_names():
        raise unsupported(name)
    if opts is None:
        opts = ESTIMATORS.options(name, **options)
    elif options:
        raise TypeError("give options either as an options object or as keywords")
    return ESTIMATORS.build(opts)
