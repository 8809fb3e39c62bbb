"""Policies turn values (positive = helps) into per-sample weights (0/1 for filtering)."""
from lai.policies.base import Policy
from lai.policies.factory import POLICIES, build_policy, build_policy_from_config
from lai.policies.mean_std import MeanStdPolicy
from lai.policies.percentile import PercentilePolicy
from lai.policies.random_drop import RandomDropPolicy
from lai.policies.reweight import ReweightPolicy
from lai.policies.score_only import ScoreOnlyPolicy
from lai.policies.spl import SPLPolicy
from lai.policies.threshold import ThresholdPolicy

__all__ = ["Policy", "ThresholdPolicy", "PercentilePolicy", "MeanStdPolicy", "ReweightPolicy",
           "SPLPolicy", "ScoreOnlyPolicy", "RandomDropPolicy", "POLICIES", "build_policy", "build_policy_from_config"]
