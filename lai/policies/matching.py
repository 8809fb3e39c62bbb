"""Find the run a random-drop control is matched to, and read its kept fraction per epoch.

``policy.match`` is either a path (a run folder or its ``summary.json``; it contains a ``/``)
or a method name (``lai``, ``ghost``, ...): then the run is looked up in this run's ``results_dir`` under
``<dataset>/<method>/*-s<seed>/`` and must have been trained with the same config in every
group but ``estimator``, ``policy`` and ``runner`` (same data, model, trainer and seed) and
with the same ``policy.start_epoch`` (warm-up), so the control and the method differ only in
which samples are dropped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf  # noqa: F401  (DictConfig: type hints)

from lai.errors import ConfigError
from lai.train.records import VOLATILE_KEYS, plain_config

# groups and keys in which a control and its matched method may differ
# (``policy.start_epoch`` is compared: a control matches the method with its own warm-up)
_FREE_KEYS = ("estimator", "runner", "run_name", "save_scores", *VOLATILE_KEYS)


class MatchError(ConfigError):
    """The matched run is missing, ambiguous or incomplete (one-line message)."""


def _comparable(cfg: Any) -> dict:
    data = plain_config(cfg, _FREE_KEYS)
    data["policy"] = {"start_epoch": (data.get("policy") or {}).get("start_epoch", 0)}
    return data


def _fractions(summary_path: Path) -> list[float]:
    try:
        data = json.loads(summary_path.read_text())
    except (OSError, ValueError) as e:
        raise MatchError(f"policy.match: cannot read {summary_path} ({e})") from None
    if data.get("status") != "completed":
        raise MatchError(f"policy.match: {summary_path} is not a completed run "
                         f"(status {data.get('status')!r})")
    return [float(row["kept_fraction"]) for row in data.get("history", [])]


def is_path(match: str) -> bool:
    """Whether ``policy.match`` names a run folder or summary file (else a method name)."""
    return "/" in match or match.endswith(".json")


def matched_keep_fractions(cfg: DictConfig) -> tuple[list[float], str]:
    """``(kept fraction per epoch, summary path)`` of the run ``cfg.policy.match`` names.

    Raises :class:`MatchError` when no completed run matches, or more than one does.
    """
    match = str(cfg.policy.match)
    if is_path(match):
        path = Path(match)
        if not path.exists():
            raise MatchError(f"policy.match={match!r}: no such run folder or summary file")
        summary = path / "summary.json" if path.is_dir() else path
        return _fractions(summary), str(summary)
    base = Path(cfg.results_dir) / cfg.dataset.name / match
    ours = _comparable(cfg)
    found = []
    for summary in sorted(base.glob(f"*-s{cfg.seed}/summary.json")):
        try:
            theirs = OmegaConf.load(summary.parent / "config.yaml")
        except (OSError, ValueError):
            continue
        if _comparable(theirs) == ours and json.loads(summary.read_text()).get(
                "status") == "completed":
            found.append(summary)
    if not found:
        raise MatchError(
            f"policy.match={match}: no completed run of {match!r} with this run's data, model, "
            f"trainer and seed ({cfg.seed}) under {base}; run it first (same overrides, "
            f"estimator={match}), or give the path of its run folder")
    if len(found) > 1:
        raise MatchError(f"policy.match={match}: {len(found)} completed runs match "
                         f"({', '.join(str(p.parent) for p in found)}); give one run folder's path")
    return _fractions(found[0]), str(found[0])
