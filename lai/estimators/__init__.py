"""Data-valuation estimators. Every score is a *value*: positive = helps.

Importing this package imports each of its modules, and each estimator registers itself in
:data:`lai.estimators.registry.ESTIMATORS` in its own module (a new one is a new file).
"""
from lai.plugins import import_submodules

import_submodules(__name__)

from lai.estimators.base import OnlineEstimator, VanillaEstimator, output_gradient  # noqa: E402
from lai.estimators.online.lai import LAIEstimator  # noqa: E402
from lai.estimators.registry import ESTIMATORS, build_estimator, estimator_options  # noqa: E402

__all__ = ["OnlineEstimator", "VanillaEstimator", "LAIEstimator", "build_estimator",
           "estimator_options", "ESTIMATORS", "output_gradient"]
