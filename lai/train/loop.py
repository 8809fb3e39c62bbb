"""The one training loop: estimator -> policy -> weighted loss, for every runner.

Each step: (maybe) refresh the validation cache; forward the training batch with the
estimator's hooks attached (one pass: the scores come from the training forward itself and
the closed-form output gradient, no extra backward); the policy turns values into weights;
the loss is the weighted mean over kept samples; backward; optimizer step.
"""
from __future__ import annotations

import math
import resource
from contextlib import nullcontext
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lai.batching import Batch, forward_logits, per_sample_loss
from lai.config import EstimatorConfig, TrainerConfig
from lai.data.base import DataBundle
from lai.estimators.base import OnlineEstimator, VanillaEstimator
from lai.policies.base import Policy
from lai.train.evaluate import evaluate
from lai.train.optim import build_optimizer, build_scheduler
from lai.train.records import RunRecorder


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: CUDA allocator peak on GPU, process max RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    seen: int = 0
    kept: int = 0
    steps: int = 0
    skipped_steps: int = 0
    dropped_noisy: int = 0
    dropped: int = 0
    scored: int = 0        # samples that were scored (outside warm-up)
    scored_noisy: int = 0  # ... of which the label is noisy
    values: list = field(default_factory=list)


def noisy_label_drop_stats(s: EpochStats) -> dict:
    """How the policy's drops line up with the known noisy labels (over scored samples).

    ``drop_rate_noisy`` / ``drop_rate_clean``: share of noisy / clean samples dropped;
    ``dropped_noisy_fraction``: share of the dropped samples whose label is noisy.
    """
    clean = s.scored - s.scored_noisy
    return {
        "drop_rate_noisy": s.dropped_noisy / s.scored_noisy if s.scored_noisy else None,
        "drop_rate_clean": (s.dropped - s.dropped_noisy) / clean if clean else None,
        "dropped_noisy_fraction": s.dropped_noisy / s.dropped if s.dropped else None,
    }


class Trainer:
    """Trains ``model`` on ``data.train`` with online valuation; evaluates every epoch.

    ``fit()`` returns the summary dict (also written to ``summary.json`` by the recorder).
    """

    def __init__(self, model: nn.Module, data: DataBundle, estimator: OnlineEstimator,
                 policy: Policy, trainer_cfg: TrainerConfig, estimator_cfg: EstimatorConfig,
                 device: torch.device, recorder: RunRecorder, seed: int = 0,
                 save_scores: bool = False, train_rows: np.ndarray | None = None):
        self.model, self.data, self.est, self.policy = model, data, estimator, policy
        self.cfg, self.ecfg = trainer_cfg, estimator_cfg
        self.device, self.rec = device, recorder
        self.save_scores = save_scores
        self.rows = (np.arange(len(data.train)) if train_rows is None
                     else np.asarray(train_rows, dtype=np.int64))
        self.gen = torch.Generator().manual_seed(seed)
        self.val_gen = torch.Generator().manual_seed(seed + 1)
        self.scoring = not isinstance(estimator, VanillaEstimator)
        self.noisy = (torch.as_tensor(data.noisy, dtype=torch.bool)
                      if data.noisy is not None else None)

    # ---- validation cache ------------------------------------------------------------
    def _val_batch(self) -> Batch:
        n = len(self.data.val)
        k = max(1, int(round(self.ecfg.val_fraction * n)))
        if self.ecfg.val_max is not None:
            k = min(k, int(self.ecfg.val_max))
        rows = torch.randperm(n, generator=self.val_gen)[:k]
        batch = self.data.val.gather(rows).to(self.device, non_blocking=True)
        return Batch(self.data.preprocess(batch.inputs, False), batch.labels, batch.idx)

    def _refresh(self) -> float:
        """Rebuild the cache; returns seconds spent."""
        t0 = time.perf_counter()
        vb = self._val_batch()
        was_training = self.model.training
        self.model.train(self.ecfg.val_mode == "train")
        try:
            self.est.refresh(self.model, vb)  # buffers (BN statistics) restored inside
        finally:
            self.model.train(was_training)
        return time.perf_counter() - t0

    # ---- one step ----------------------------------------------------------------------
    def _step(self, batch: Batch, epoch: int, step: int, stats: EpochStats) -> dict:
        score_now = self.scoring and self.policy.active(epoch)
        inputs = self.data.preprocess(batch.inputs, True)
        self.model.train()
        with (self.est.capture(self.model, Batch(inputs, batch.labels, batch.idx))
              if score_now else nullcontext()) as cap:
            logits = forward_logits(self.model, inputs)
        losses = per_sample_loss(logits.float(), batch.labels)
        values = self.est.score(cap) if score_now else None
        weights = (self.policy.select(values, step, epoch) if values is not None
                   else torch.ones_like(losses))
        kept = int(weights.gt(0).sum())  # one host sync: the record and the skip need it
        b = len(batch)
        if kept > 0:
            loss = (weights * losses).sum() / weights.sum()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.opt.step()
        else:
            stats.skipped_steps += 1
        self.sched.step()
        stats.loss_sum += float(losses.detach().sum())
        stats.seen += b
        stats.kept += kept
        stats.steps += 1
        if values is not None:
            dropped = weights.le(0).cpu()
            stats.dropped += int(dropped.sum())
            stats.scored += b
            if self.noisy is not None:
                noisy = self.noisy[batch.idx.cpu()]
                stats.scored_noisy += int(noisy.sum())
                stats.dropped_noisy += int(noisy[dropped].sum())
            if self.save_scores:
                self._epoch_values[batch.idx.cpu().numpy()] = values.float().cpu().numpy()
                self._epoch_kept[batch.idx.cpu().numpy()] = weights.gt(0).cpu().numpy()
        elif self.save_scores:
            self._epoch_kept[batch.idx.cpu().numpy()] = 1
        return {"loss": float(losses.detach().mean()), "kept": kept, "batch": b,
                "value_mean": float(values.mean()) if values is not None else None}

    # ---- the whole run -----------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        bs = cfg.batch_size
        steps_per_epoch = math.ceil(len(self.rows) / bs)
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, int(cfg.max_steps))
        self.opt = build_optimizer(self.model, cfg)
        self.sched = build_scheduler(self.opt, cfg, total)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start = time.perf_counter()
        history, samples_per_epoch, refresh_time, step = [], [], 0.0, 0
        totals = EpochStats()
        last_eval: dict = {}
        for epoch in range(cfg.epochs):
            if step >= total:
                break
            stats = EpochStats()
            n_train = len(self.data.train)
            if self.save_scores:
                self._epoch_values = np.full(n_train, np.nan, dtype=np.float32)
                self._epoch_kept = np.full(n_train, -1, dtype=np.int8)
            order = torch.as_tensor(self.rows)[torch.randperm(len(self.rows), generator=self.gen)]
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not cfg.progress, leave=False, dynamic_ncols=True)
            for i in bar:
                if step >= total:
                    break
                if (self.scoring and self.policy.active(epoch)
                        and step % max(1, self.ecfg.refresh_every) == 0):
                    refresh_time += self._refresh()
                rows = order[i * bs:(i + 1) * bs]
                batch = self.data.train.gather(rows).to(self.device, non_blocking=True)
                out = self._step(batch, epoch, step, stats)
                step += 1
                bar.set_postfix(loss=f"{out['loss']:.3f}", kept=f"{out['kept']}/{out['batch']}")
                self.rec.log("step", step=step, epoch=epoch, lr=self.sched.get_last_lr()[0], **out)
            bar.close()
            samples_per_epoch.append(stats.kept)
            for f in ("dropped", "dropped_noisy", "scored", "scored_noisy"):
                setattr(totals, f, getattr(totals, f) + getattr(stats, f))
            row = {"epoch": epoch, "step": step, "train_loss": stats.loss_sum / max(1, stats.seen),
                   "seen": stats.seen, "samples_used": stats.kept,
                   "kept_fraction": stats.kept / max(1, stats.seen),
                   "skipped_steps": stats.skipped_steps,
                   "elapsed_s": time.perf_counter() - t_start}
            if self.noisy is not None and stats.scored:
                row.update(noisy_label_drop_stats(stats))
            if cfg.eval_every_epoch or epoch == cfg.epochs - 1:
                last_eval = self._evaluate()
                row.update(last_eval)
            history.append(row)
            self.rec.log("epoch", **row)
            if self.save_scores:
                self.rec.save_scores(epoch, self._epoch_values, self._epoch_kept)
        if not last_eval or (history and "test_acc" not in history[-1]):
            last_eval = self._evaluate()
        wall = time.perf_counter() - t_start
        peak, peak_kind = peak_memory_mb(self.device)
        seen = sum(r["seen"] for r in history)
        test_accs = [r["test_acc"] for r in history if "test_acc" in r] or [last_eval["test_acc"]]
        summary = {
            "status": "completed", "epochs": len(history), "steps": step,
            "final_test_acc": last_eval["test_acc"], "best_test_acc": max(test_accs),
            "final_test_loss": last_eval["test_loss"], "final_val_loss": last_eval["val_loss"],
            "final_val_acc": last_eval["val_acc"],
            "samples_per_epoch": samples_per_epoch,
            "kept_fraction": sum(samples_per_epoch) / max(1, seen),
            "wall_time_s": wall, "cache_refresh_s": refresh_time,
            "peak_memory_mb": peak, "peak_memory_kind": peak_kind,
        }
        if self.noisy is not None and totals.scored:
            summary.update(noisy_label_drop_stats(totals))
        if "test_ppl" in last_eval:
            summary["final_test_ppl"] = last_eval["test_ppl"]
            summary["final_val_ppl"] = last_eval["val_ppl"]
        return summary

    def _evaluate(self) -> dict:
        out = {}
        ebs = self.cfg.eval_batch_size
        for split_name in ("val", "test"):
            res = evaluate(self.model, getattr(self.data, split_name), self.data, self.device, ebs)
            out.update({f"{split_name}_{k}": v for k, v in res.items() if k != "n"})
        return out
