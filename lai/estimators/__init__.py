"""Online data-valuation estimators. Every score is a *value*: positive = helps."""
from lai.estimators.base import OnlineEstimator, VanillaEstimator, output_gradient
from lai.estimators.lai import LAIEstimator
from lai.estimators.registry import build_estimator

__all__ = ["OnlineEstimator", "VanillaEstimator", "LAIEstimator", "build_estimator",
           "output_gradient"]
