"""The policy registry: every policy name, its options dataclass and its class.

A policy module defines its class and an options dataclass (a :class:`PolicyOptions`
whose fields, besides ``name``, are the constructor's keywords and the config keys
``policy.<key>``) and calls :func:`register_policy`. ``lai/policies/__init__.py`` imports
the built-in modules; see ``docs/extending.md`` for a new one.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from omegaconf import MISSING

from lai.plugins import Registry, options_from_config
from lai.policies.base import Policy

POLICIES: Registry = Registry("policy")


@dataclass
class PolicyOptions:
    """Options every policy has."""

    name: str = MISSING
    start_epoch: int = 0  # warm-up: epochs (0-based) before this one train on every sample


def register_policy(cls: type, options: type, **meta: Any) -> type:
    """Register policy class ``cls`` under ``cls.name`` with ``options``; sets
    ``cls.params`` from the options' fields. ``meta``: e.g. ``estimator="spl"``, a policy
    that works only with that estimator. Returns ``cls``."""
    keys = tuple(f.name for f in fields(options) if f.name not in ("name", "start_epoch"))
    cls.params = keys

    def build(o: Any) -> Policy:
        return cls(**{f.name: getattr(o, f.name) for f in fields(o) if f.name != "name"})

    build.__qualname__ = f"{cls.__qualname__}.from_options"
    POLICIES.register(cls.name, options, **meta)(build)
    return cls


def build_policy(name: str, **options: Any) -> Policy:
    """The policy ``name`` with its options as keywords (the rest default). An option the
    policy does not have is a TypeError, an unknown name or a bad value a ValueError."""
    return POLICIES.build(POLICIES.options(name, **options))


def build_policy_from_config(node: Any) -> Policy:
    """The policy a composed config node (``cfg.policy``), an options dataclass or a
    mapping with a ``name`` describes."""
    return POLICIES.build(options_from_config(node, POLICIES))
