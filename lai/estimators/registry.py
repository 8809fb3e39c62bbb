"""Estimator names -> objects, for the runner (from config) and for :func:`lai.value`."""
from __future__ import annotations

from lai.estimators.base import OnlineEstimator, VanillaEstimator
from lai.estimators.ghost import GhostEstimator
from lai.estimators.lai import LAIEstimator
from lai.estimators.spl import SPLEstimator

ONLINE = ("vanilla", "lai", "lli", "ghost", "spl")
PLANNED = {
    "ip": "static IP (two-round)",
    "lissa": "LiSSA (two-round)",
    "datainf": "DataInf (two-round)",
    "trak": "TRAK (two-round)",
}


def unsupported(method: str) -> ValueError:
    """A one-line error for an estimator name that is unknown or not implemented yet."""
    if method in PLANNED:
        return ValueError(f"estimator {method!r} ({PLANNED[method]}) is not implemented in this "
                          f"version; available: {', '.join(ONLINE)}")
    return ValueError(f"unknown estimator {method!r}; available: {', '.join(ONLINE)}")


def build_estimator(method: str, *, layers: str | None = None, output_layer: str | None = None,
                    cache: str = "auto", chunk_size: int = 512) -> OnlineEstimator:
    """An online estimator by name. ``layers`` applies to ``lai`` (default ``all``)."""
    if method == "vanilla":
        return VanillaEstimator()
    if method == "lai":
        return LAIEstimator(layers or "all", output_layer, cache, chunk_size)
    if method == "lli":
        if layers not in (None, "lli"):
            raise ValueError("estimator lli uses the output layer only; use lai with "
                             f"layers={layers!r} instead")
        return LAIEstimator("lli", output_layer, cache, chunk_size)
    if method == "ghost":
        return GhostEstimator(chunk_size)
    if method == "spl":
        return SPLEstimator()
    raise unsupported(method)
