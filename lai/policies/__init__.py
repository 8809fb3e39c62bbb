"""Policies turn values (positive = helps) into per-sample weights (0/1 for filtering).

Importing this package imports each of its modules, and each policy registers itself in
:data:`lai.policies.registry.POLICIES` in its own module (a new one is a new file).
"""
from lai.plugins import import_submodules

import_submodules(__name__)

from lai.policies.base import Policy  # noqa: E402
from lai.policies.mean_std import MeanStdPolicy  # noqa: E402
from lai.policies.percentile import PercentilePolicy  # noqa: E402
from lai.policies.random_drop import RandomDropPolicy  # noqa: E402
from lai.policies.registry import (POLICIES, PolicyOptions, build_policy,  # noqa: E402
                                   build_policy_from_config, register_policy)
from lai.policies.reweight import ReweightPolicy  # noqa: E402
from lai.policies.score_only import ScoreOnlyPolicy  # noqa: E402
from lai.policies.spl import SPLPolicy  # noqa: E402
from lai.policies.threshold import ThresholdPolicy  # noqa: E402

__all__ = ["Policy", "PolicyOptions", "ThresholdPolicy", "PercentilePolicy", "MeanStdPolicy",
           "ReweightPolicy", "SPLPolicy", "ScoreOnlyPolicy", "RandomDropPolicy", "POLICIES",
           "build_policy", "build_policy_from_config", "register_policy"]
