"""The two-round runner for static estimators (paper App. D.2.4).

Round 1 trains as configured (plain training). The static estimator then scores every
training sample on the final model, in eval mode and without augmentation, against the
validation split. Samples with value < ``runner.threshold`` are removed, and round 2 retrains
from a fresh initialisation with the same config on the rest.

Round 1 does not depend on the static estimator: every static method with the same data,
model, trainer and seed trains the same round 1. The first such run stores its final model
(and TRAK's checkpoints) in ``<results_dir>/.round1/``; the others load it instead of training
it again (their summary's ``round1_from`` says so). The stored model is the state a fresh round
1 would reach in this process (same seed, same data order).

Written into the run folder: both rounds' records in ``metrics.jsonl`` (field ``round``; a
reused round 1 has one ``round1_reused`` line), ``static_scores.npy`` (float32 ``[N]``,
positive = helps), ``removed_indices.npy``, and a summary with round 2's metrics at the top
level plus the removal statistics.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lai.batching import Batch
from lai.data.base import DataBundle, TensorSplit
from lai.estimators.base import VanillaEstimator
from lai.estimators.registry import estimator_options
from lai.estimators.static import static_values
from lai.policies.threshold import ThresholdPolicy
from lai.train.loop import Trainer
from lai.train.noisy import detection_metrics
from lai.train.records import RunRecorder, _jsonable, config_hash


def _batches(split: TensorSplit, rows: torch.Tensor, data: DataBundle, device: torch.device,
             size: int) -> list[Batch]:
    """Eval-style batches (no augmentation) of the given rows, in order."""
    out = []
    for start in range(0, len(rows), size):
        b = split.gather(rows[start:start + size]).to(device)
        out.append(Batch(data.preprocess(b.inputs, False), b.labels, b.idx))
    return out


def static_options(cfg: DictConfig, checkpoints: list[dict], info: dict | None = None) -> dict:
    """The keywords of the configured static estimator's values function (LiSSA also reports
    into ``info``: its scale, steps and residual)."""
    return estimator_options(cfg.estimator).keywords(
        seed=cfg.seed, progress=bool(cfg.trainer.progress), checkpoints=checkpoints,
        info={} if info is None else info)


def round1_path(cfg: DictConfig, ckpt_epochs: set[int]) -> Path:
    """Where round 1 of this config is stored: keyed by everything but the estimator, the
    policy, the runner and the run's name, and by the checkpoint epochs kept."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("estimator", "policy", "runner", "run_name", "save_scores"):
        plain.pop(key, None)
    plain["checkpoint_epochs"] = sorted(ckpt_epochs)
    key = config_hash(plain)
    return Path(cfg.results_dir) / ".round1" / f"{cfg.dataset.name}-{key}-s{cfg.seed}.pt"


def _round1(cfg: DictConfig, data: DataBundle, make_model: Callable[[], nn.Module],
            device: torch.device, recorder: RunRecorder, ckpt_epochs: set[int]
            ) -> tuple[nn.Module, list[dict], dict, str | None]:
    """``(model, checkpoints, summary, reused from)``: round 1 loaded from the store when an
    earlier static run trained it, else trained here and stored (atomically; a file lock
    makes a concurrent run with the same round 1 wait for it instead of training it too)."""
    path = round1_path(cfg, ckpt_epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        model = make_model()
        if path.is_file():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(stored["model"])
            summary = json.loads(stored["summary"])
            recorder.log("round1_reused", source=str(path), **{
                k: summary[k] for k in ("final_test_acc", "wall_time_s")})
            return model, stored["checkpoints"], summary, str(path)
        recorder.context = {"round": 1}
        r1 = Trainer(model, data, VanillaEstimator(), ThresholdPolicy(), cfg.trainer,
                     cfg.estimator, device, recorder, seed=cfg.seed,
                     checkpoint_epochs=ckpt_epochs)
        summary = r1.fit()
        tmp = f"{path}.tmp"
        torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "checkpoints": r1.checkpoints, "summary": json.dumps(_jsonable(summary))},
                   tmp)
        os.replace(tmp, path)
        return model, r1.checkpoints, summary, None


def run_two_round(cfg: DictConfig, data: DataBundle, make_model: Callable[[], nn.Module],
                  device: torch.device, recorder: RunRecorder) -> dict:
    """Round 1 (trained, or loaded from the store), static scoring, removal, round 2;
    returns the summary fields."""
    tcfg = cfg.trainer
    opts = estimator_options(cfg.estimator)
    keep_ckpt = opts.checkpoint_epochs()
    ckpt_epochs = set(range(max(0, tcfg.epochs - keep_ckpt), tcfg.epochs))

    model, checkpoints, s1, reused = _round1(cfg, data, make_model, device, recorder,
                                             ckpt_epochs)

    t0 = time.perf_counter()
    model.eval()
    n = len(data.train)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    n_val = max(1, int(round(opts.val_fraction * len(data.val))))
    if opts.val_max is not None:
        n_val = min(n_val, int(opts.val_max))
    val_rows = torch.randperm(len(data.val), generator=gen)[:n_val]
    hess_rows = torch.randperm(n, generator=gen)[:min(n, opts.curvature_samples())]
    size = tcfg.eval_batch_size
    solver: dict = {}  # what the estimator reports about its solve (LiSSA's residual)
    values = static_values(
        cfg.estimator.name, model, _batches(data.train, torch.arange(n), data, device, size),
        _batches(data.val, val_rows, data, device, size),
        _batches(data.train, hess_rows, data, device, tcfg.batch_size),
        **static_options(cfg, checkpoints, solver))
    values = values.detach().float().cpu().numpy()
    scoring_s = time.perf_counter() - t0
    removed = np.flatnonzero(values < cfg.runner.threshold)
    kept_rows = np.setdiff1d(np.arange(n), removed)
    np.save(recorder.dir / "static_scores.npy", values.astype(np.float32))
    np.save(recorder.dir / "removed_indices.npy", removed.astype(np.int64))
    stats = {"removed": int(len(removed)), "kept_train": int(len(kept_rows)),
             "static_scoring_s": scoring_s, "n_val_scored_against": int(n_val),
             **{f"{cfg.estimator.name}_{k}": v for k, v in solver.items()}}
    if data.noisy is not None:
        kept_flags = np.ones(n, dtype=np.int8)
        kept_flags[removed] = 0
        stats["removed_noisy"] = int(np.asarray(data.noisy)[removed].sum())
        stats.update(detection_metrics(values, kept_flags, np.asarray(data.noisy, dtype=bool)))
    recorder.log("static", estimator=cfg.estimator.name, **stats)
    if len(kept_rows) == 0:
        raise RuntimeError(f"{cfg.estimator.name} removed every training sample "
                           f"(all values < {cfg.runner.threshold}); nothing to retrain on")

    recorder.context = {"round": 2}
    r2 = Trainer(make_model(), data, VanillaEstimator(), ThresholdPolicy(), tcfg, cfg.estimator,
                 device, recorder, seed=cfg.seed, train_rows=kept_rows)
    s2 = r2.fit()
    s2["wall_time_s"] += s1["wall_time_s"] + scoring_s
    s2["kept_fraction"] = len(kept_rows) / n
    s2["round1"] = {k: s1[k] for k in ("final_test_acc", "best_test_acc", "final_val_loss",
                                       "wall_time_s", "samples_per_epoch")}
    s2["round1_from"] = reused  # None: trained in this run
    return {**s2, **stats}
