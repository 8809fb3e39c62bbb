"""lai: online data valuation (Layer-Aware Influence and friends).

``from lai import value`` scores a batch with your own model; ``run.py`` runs experiments.
Every score in this package is a *value*: positive = the sample helps (lowers validation loss).
"""
from lai.api import pairwise, value
from lai.curate import CurationStep, Curator

__version__ = "0.1.0"
__all__ = ["value", "pairwise", "Curator", "CurationStep", "__version__"]
