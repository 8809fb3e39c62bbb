"""Run records: one folder per run, never shared, written as the run goes.

    <results_dir>/<dataset>/<estimator>/<config hash>-s<seed>/
        config.yaml     resolved config (written before training starts)
        checkpoint.pt   the state at the end of the last finished epoch (online runner): the
                        same command resumes from it after a crash or a kill
        run.lock        held (flock) while a process works in the folder
        metrics.jsonl   one JSON object per line: {"kind": "step"|"epoch"|..., ...}, flushed;
                        a "step" line sums up the ``steps`` steps since the previous one
                        (trainer.log_every, and the end of each epoch): ``step`` = the last
                        of them, ``loss`` = mean per-sample loss, ``kept``/``batch`` =
                        totals, ``value_mean`` = mean value (log_every=1: one per step)
        summary.json    final metrics; written at the end, and with status "failed" and the
                        error if the run crashes, so nothing already measured is lost
        scores/epoch_XXX.npz   optional per-sample values and keep decisions by dataset index
        scores/noisy.npy       with the scores, when the noise is known: which labels are noisy
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return _jsonable(x.item())
    return x


# config keys that change how a run is shown or where it is written, not what it computes
VOLATILE_KEYS = ("trainer.progress", "trainer.log_every", "trainer.checkpoint_every",
                 "results_dir", "data_dir", "logger", "extra")


def plain_config(cfg: DictConfig | dict, drop: tuple[str, ...] = ()) -> dict:
    """The resolved config as plain JSON-able data, without the dotted keys in ``drop``."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    data = json.loads(json.dumps(data, default=str))
    for dotted in drop:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return data


def config_hash(cfg: DictConfig | dict, length: int = 12) -> str:
    """A run's identity: sha256 of its resolved config without :data:`VOLATILE_KEYS`."""
    data = plain_config(cfg, VOLATILE_KEYS)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def run_dir_for(results_dir: str | Path, *parts: str, seed: int, identity: str) -> Path:
    """The one folder of the run with config hash ``identity`` (not created here)."""
    return Path(results_dir).joinpath(*parts) / f"{identity}-s{seed}"


def completed_summary(run_dir: Path) -> dict | None:
    """The summary of a completed run in ``run_dir``, else None."""
    path = Path(run_dir) / "summary.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("status") == "completed" else None


class RunInUseError(RuntimeError):
    """Another live process holds the run folder's lock."""


def lock_run_dir(run_dir: Path):
    """Create ``run_dir`` and take its ``run.lock`` (flock, released when the process ends,
    even on SIGKILL); returns the open lock file. Raises :class:`RunInUseError` when another
    process holds it (the same config and seed is running)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / "run.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise RunInUseError(f"run folder {run_dir} is in use by another process (same config "
                            "and seed); wait for it, or set run_name to run a copy") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{platform.node()} {os.getpid()}\n")
    fh.flush()
    return fh


class RunRecorder:
    """Writes config.yaml, metrics.jsonl, summary.json (and optional scores) for one run."""

    def __init__(self, run_dir: Path, cfg: DictConfig | dict, wandb_run: Any = None,
                 metrics_bytes: int = 0):
        """``metrics_bytes``: keep this many bytes of an existing metrics.jsonl (a resumed
        run keeps the lines up to its checkpoint); 0 starts it afresh."""
        self.dir = Path(run_dir)
        self.wandb = wandb_run
        self.context: dict = {}  # merged into every record line (e.g. {"round": 2})
        text = OmegaConf.to_yaml(cfg) if isinstance(cfg, DictConfig) else \
            OmegaConf.to_yaml(OmegaConf.create(cfg))
        (self.dir / "config.yaml").write_text(text)
        path = self.dir / "metrics.jsonl"
        with open(path, "a") as f:
            f.truncate(min(metrics_bytes, os.path.getsize(path)))
        self._metrics = open(path, "a", buffering=1)

    def metrics_bytes(self) -> int:
        """Bytes written to metrics.jsonl so far (stored in a checkpoint)."""
        self._metrics.flush()
        return self._metrics.tell()

    def log(self, kind: str, **values: Any) -> None:
        """Append one record line (flushed at once)."""
        row = {"kind": kind, "time": time.time(), **self.context, **_jsonable(values)}
        self._metrics.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in row.items()
                            if isinstance(v, (int, float)) and k != "time"})

    def save_scores(self, epoch: int, values: np.ndarray, kept: np.ndarray,
                    noisy: np.ndarray | None = None) -> Path:
        """Per-sample values (float32, NaN = not scored) and keep decisions (int8: 1 kept,
        0 dropped, -1 not seen) of one epoch, indexed by training-set position. ``noisy``
        (bool, label differs from the clean one), when given, goes to ``scores/noisy.npy``."""
        folder = self.dir / "scores"
        folder.mkdir(exist_ok=True)
        if noisy is not None:
            np.save(folder / "noisy.npy", np.asarray(noisy, dtype=bool))
        path = folder / f"epoch_{epoch:03d}.npz"
        np.savez_compressed(path, values=values.astype(np.float32), kept=kept.astype(np.int8))
        return path

    def summary(self, **values: Any) -> dict:
        """Write summary.json (atomically) and return it."""
        data = _jsonable({"host": platform.node(), **values})
        tmp = self.dir / "summary.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.dir / "summary.json")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in data.items()
                                       if isinstance(v, (int, float, str))})
        return data

    def close(self) -> None:
        self._metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullRecorder:
    """A recorder that writes nothing (data-parallel ranks other than 0)."""

    def __init__(self):
        self.dir, self.wandb, self.context = None, None, {}

    def log(self, kind: str, **values: Any) -> None:
        pass

    def save_scores(self, *args: Any, **kwargs: Any) -> None:
        return None

    def summary(self, **values: Any) -> dict:
        return _jsonable({"host": platform.node(), **values})

    def metrics_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass
