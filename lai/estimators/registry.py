"""Estimator names -> objects, for the runner (from config) and for :func:`lai.value`."""
from __future__ import annotations

from lai.estimators.base import OnlineEstimator, VanillaEstimator
from lai.estimators.ghost import GhostEstimator
from lai.estimators.lai import LAIEstimator
from lai.estimators.spl import SPLEstimator

ONLINE = ("vanilla", "lai", "lli", "ghost", "spl")


STATIC_NAMES = ("ip", "lissa", "datainf", "trak")


def unsupported(method: str) -> ValueError:
    """A one-line error for an estimator name that is unknown or used in the wrong place."""
    if method in STATIC_NAMES:
        return ValueError(f"estimator {method!r} is static (two-round): use runner=two_round, "
                          f"or lai.value(..., method={method!r}); online ones: {', '.join(ONLINE)}")
    return ValueError(f"unknown estimator {method!r}; online: {', '.join(ONLINE)}; "
                      f"static: {', '.join(STATIC_NAMES)}")


def build_estimator(method: str, *, layers: str | None = None, output_layer: str | None = None,
                    cache: str = "auto", chunk_size: int = 512,
                    ghost_mode: str = "auto", offload: bool = False,
                    release_tangents: bool = True,
                    forward_fastpaths: bool = True) -> OnlineEstimator:
    """An online estimator by name. ``layers`` applies to ``lai`` (default ``all``),
    ``ghost_mode`` (auto | forward | probe), ``release_tangents`` (forward form: free the
    tangents nothing can read any more, :mod:`lai.estimators.tangents`) and
    ``forward_fastpaths`` (forward form: constants without efficient-zero tangents, lean
    train-mode BatchNorm and softmax tangents, :mod:`lai.estimators.forward_fastpaths`) to
    ``ghost``, ``offload`` (the validation cache in host memory, prefetched layer by layer)
    to ``lai`` and ``lli``."""
    if offload and method not in ("lai", "lli"):
        raise ValueError(f"offload applies to lai and lli, not {method!r}")
    if method == "vanilla":
        return VanillaEstimator()
    if method == "lai":
        return LAIEstimator(layers or "all", output_layer, cache, chunk_size, offload=offload)
    if method == "lli":
        if layers not in (None, "lli"):
            raise ValueError("estimator lli uses the output layer only; use lai with "
                             f"layers={layers!r} instead")
        return LAIEstimator("lli", output_layer, cache, chunk_size, offload=offload)
    if method == "ghost":
        return GhostEstimator(chunk_size, mode=ghost_mode, release_tangents=release_tangents,
                              forward_fastpaths=forward_fastpaths)
    if method == "spl":
        return SPLEstimator()
    raise unsupported(method)
