"""Build a policy by name or from a ``PolicyConfig``."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Dict, Type

from lai.config import PolicyConfig
from lai.policies.base import Policy
from lai.policies.mean_std import MeanStdPolicy
from lai.policies.percentile import PercentilePolicy
from lai.policies.random_drop import RandomDropPolicy
from lai.policies.reweight import ReweightPolicy
from lai.policies.score_only import ScoreOnlyPolicy
from lai.policies.spl import SPLPolicy
from lai.policies.threshold import ThresholdPolicy

POLICIES: Dict[str, Type[Policy]] = {
    cls.name: cls
    for cls in (ThresholdPolicy, PercentilePolicy, MeanStdPolicy, ReweightPolicy, SPLPolicy,
                ScoreOnlyPolicy, RandomDropPolicy)
}
CONFIG_FIELDS = tuple(f.name for f in fields(PolicyConfig) if f.name != "name")


def build_policy(name: str, **kwargs: Any) -> Policy:
    """The policy ``name`` with the ``PolicyConfig`` fields in ``kwargs`` that it uses.

    ``kwargs`` may hold any ``PolicyConfig`` field (``threshold``, ``start_epoch``,
    ``keep_fraction``, ``k``, ``temperature``, ``spl_start_fraction``, ``spl_lambda``,
    ``spl_growth``, ``match``); fields another policy uses are ignored, missing ones take the
    constructor's default (= the ``PolicyConfig`` default). Unknown keys raise TypeError,
    unknown names ValueError.
    """
    unknown = sorted(set(kwargs) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"build_policy() got unknown argument(s) {', '.join(unknown)}; "
                        f"known: {', '.join(CONFIG_FIELDS)}")
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}")
    return cls(**{k: v for k, v in kwargs.items() if k in cls.params or k == "start_epoch"})


def build_policy_from_config(cfg: Any) -> Policy:
    """The policy a ``PolicyConfig`` (dataclass or OmegaConf node) describes."""
    cls = POLICIES.get(cfg.name)
    if cls is None:
        raise ValueError(f"unknown policy {cfg.name!r}; available: {', '.join(POLICIES)}")
    kwargs = {p: getattr(cfg, p) for p in (*cls.params, "start_epoch")}
    return build_policy(cfg.name, **kwargs)
