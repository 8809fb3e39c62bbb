"""Fidelity of proxy values against a Shapley reference (paper §5.1, Figure 1)."""
from lai.fidelity.shapley import exact_shapley, permutation_shapley, sgd_step_utility

__all__ = ["exact_shapley", "permutation_shapley", "sgd_step_utility"]
