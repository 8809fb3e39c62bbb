"""Policies turn values into per-sample weights (0/1 for filtering)."""
from lai.policies.base import Policy, ThresholdPolicy, build_policy

__all__ = ["Policy", "ThresholdPolicy", "build_policy"]
