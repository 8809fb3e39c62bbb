"""The one training loop: estimator -> policy -> weighted loss, for every runner.

Each step: (maybe) refresh the validation cache; score the batch; the policy turns values
into weights; the loss is the weighted mean over kept samples; backward; optimizer step.

Two execution strategies (``trainer.strategy``):

- ``one_pass``: the estimator's hooks ride on the training forward itself (LAI needs only
  the closed-form output gradient; Ghost's forward carries tangents), then one backward of
  the weighted loss ("masked backward": dropped samples have weight 0);
- ``two_pass``: a no-grad scoring forward (buffers such as BatchNorm statistics restored),
  then forward + backward on the kept samples only, so dropped samples cost no backward.

Validation samples never share a train-mode forward with training samples: the cache is
built from its own forward (in ``estimator.val_mode``, buffers restored).
"""
from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lai.batching import Batch, forward_logits, per_sample_loss
from lai.config import EstimatorConfig, TrainerConfig
from lai.data.base import DataBundle
from lai.estimators.base import OnlineEstimator, VanillaEstimator
from lai.estimators.capture import preserved_buffers
from lai.policies.base import Policy
from lai.train.evaluate import evaluate
from lai.train.noisy import detection_metrics
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


class Trainer:
    """Trains ``model`` on ``data.train`` with online valuation; evaluates every epoch.

    ``fit()`` returns the summary dict (the runner writes it to ``summary.json``).
    ``train_rows`` restricts training to those training-set indices (two-round runners).
    """

    def __init__(self, model: nn.Module, data: DataBundle, estimator: OnlineEstimator,
                 policy: Policy, trainer_cfg: TrainerConfig, estimator_cfg: EstimatorConfig,
                 device: torch.device, recorder: RunRecorder, seed: int = 0,
                 save_scores: bool = False, train_rows: np.ndarray | None = None,
                 checkpoint_epochs: set[int] | None = None):
        self.model, self.data, self.est, self.policy = model, data, estimator, policy
        self.cfg, self.ecfg = trainer_cfg, estimator_cfg
        self.device, self.rec = device, recorder
        self.save_scores = save_scores
        self.rows = (np.arange(len(data.train)) if train_rows is None
                     else np.asarray(train_rows, dtype=np.int64))
        self.gen = torch.Generator().manual_seed(seed)
        self.val_gen = torch.Generator().manual_seed(seed + 1)
        self.scoring = not isinstance(estimator, VanillaEstimator)
        self.self_influence = bool(estimator_cfg.self_influence)
        self.noisy = np.asarray(data.noisy, dtype=bool) if data.noisy is not None else None
        self.opt: torch.optim.Optimizer | None = None
        self.checkpoint_epochs = checkpoint_epochs or set()
        self.checkpoints: list[dict] = []  # CPU state_dicts at the end of checkpoint_epochs

    # ---- validation cache ------------------------------------------------------------
    def _val_batch(self) -> Batch:
        n = len(self.data.val)
        k = max(1, int(round(self.ecfg.val_fraction * n)))
        if self.ecfg.val_max is not None:
            k = min(k, int(self.ecfg.val_max))
        rows = torch.randperm(n, generator=self.val_gen)[:k]
        batch = self.data.val.gather(rows).to(self.device, non_blocking=True)
        return Batch(self.data.preprocess(batch.inputs, False), batch.labels, batch.idx)

    def _refresh(self, batch: Batch | None = None) -> float:
        """Rebuild the cache from ``batch`` (default: a fresh validation draw); seconds spent."""
        t0 = time.perf_counter()
        vb = batch if batch is not None else self._val_batch()
        was_training = self.model.training
        self.model.train(self.ecfg.val_mode == "train")
        try:
            self.est.refresh(self.model, vb)  # buffers (BN statistics) restored inside
        finally:
            self.model.train(was_training)
        return time.perf_counter() - t0

    # ---- one step ----------------------------------------------------------------------
    def _score(self, batch: Batch, grad: bool):
        """Forward ``batch`` with the estimator attached; returns (logits, values)."""
        ctx = nullcontext() if grad else torch.no_grad()
        with ctx, (nullcontext() if grad else preserved_buffers(self.model)):
            with self.est.capture(self.model, batch) as cap:
                logits = forward_logits(self.model, batch.inputs)
            return logits, self.est.score(cap)

    def _update(self, losses: torch.Tensor, weights: torch.Tensor) -> None:
        """Backward of the weighted mean of per-sample ``losses`` [B]; optimizer step."""
        loss = (weights * losses).sum() / weights.sum()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()

    def _step(self, raw: Batch, epoch: int, step: int, stats: EpochStats) -> dict:
        score_now = self.scoring and self.policy.active(epoch)
        batch = Batch(self.data.preprocess(raw.inputs, True), raw.labels, raw.idx)
        self.model.train()
        values = None
        two_pass = score_now and self.cfg.strategy == "two_pass"
        if score_now and self.self_influence:
            self._refresh_s += self._refresh(batch)
        if not score_now:
            logits = forward_logits(self.model, batch.inputs)
        else:
            logits, values = self._score(batch, grad=not two_pass)
        # computed once: it feeds the backward (one pass) and the record
        losses = per_sample_loss(logits.float(), batch.labels)
        weights = (self.policy.select(values, step, epoch) if values is not None
                   else torch.ones_like(losses))
        keep = weights > 0
        kept = int(keep.sum())  # one host sync: the skip decision and the record need it
        if kept > 0:
            if two_pass:  # forward + backward on the kept samples only
                sub = batch.select(keep)
                self._update(per_sample_loss(forward_logits(self.model, sub.inputs).float(),
                                             sub.labels), weights[keep])
            else:
                self._update(losses, weights)
        else:
            stats.skipped_steps += 1
        self.sched.step()
        b = len(batch)
        loss_sum = float(losses.detach().sum())
        stats.loss_sum += loss_sum
        stats.seen += b
        stats.kept += kept
        stats.steps += 1
        value_mean = None
        if values is not None:
            idx = raw.idx.cpu().numpy()
            vals = values.detach().float().cpu().numpy()
            self._epoch_values[idx] = vals
            self._epoch_kept[idx] = keep.cpu().numpy()
            value_mean = float(vals.mean())
        elif self.save_scores:
            self._epoch_kept[raw.idx.cpu().numpy()] = 1
        return {"loss": loss_sum / b, "kept": kept, "batch": b, "value_mean": value_mean}

    # ---- the whole run -----------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        bs = cfg.batch_size
        steps_per_epoch = math.ceil(len(self.rows) / bs)
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, int(cfg.max_steps))
        self.opt = build_optimizer(self.model, cfg)
        if hasattr(self.est, "bind_optimizer"):
            self.est.bind_optimizer(self.model, self.opt, self.ecfg.precondition)
        self.sched = build_scheduler(self.opt, cfg, total)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_start = time.perf_counter()
        history, samples_per_epoch, step = [], [], 0
        self._refresh_s = 0.0
        periodic_refresh = (self.scoring and not self.self_influence
                            and getattr(self.est, "needs_validation", True))
        all_values, all_kept = [], []
        last_eval: dict = {}
        n_train = len(self.data.train)
        self.checkpoints = []
        eval_at = {int(s) for s in cfg.eval_at_steps}
        step_evals: dict[str, dict] = {}
        removed = 0
        for epoch in range(cfg.epochs):
            if step >= total:
                break
            stats = EpochStats()
            self._epoch_values = np.full(n_train, np.nan, dtype=np.float32)
            self._epoch_kept = np.full(n_train, -1, dtype=np.int8)
            order = torch.as_tensor(self.rows)[torch.randperm(len(self.rows), generator=self.gen)]
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=not cfg.progress, leave=False, dynamic_ncols=True)
            for i in bar:
                if step >= total:
                    break
                if (periodic_refresh and self.policy.active(epoch)
                        and step % max(1, self.ecfg.refresh_every) == 0):
                    self._refresh_s += self._refresh()
                rows = order[i * bs:(i + 1) * bs]
                batch = self.data.train.gather(rows).to(self.device, non_blocking=True)
                out = self._step(batch, epoch, step, stats)
                step += 1
                bar.set_postfix(loss=f"{out['loss']:.3f}", kept=f"{out['kept']}/{out['batch']}")
                self.rec.log("step", step=step, epoch=epoch, lr=self.sched.get_last_lr()[0], **out)
                if step in eval_at:  # e.g. Table 1's perplexity after 5,000 and 10,000 batches
                    step_evals[str(step)] = {"removed_so_far": removed + stats.seen - stats.kept,
                                             **self._evaluate()}
                    self.rec.log("step_eval", step=step, **step_evals[str(step)])
            bar.close()
            samples_per_epoch.append(stats.kept)
            removed += stats.seen - stats.kept
            row = {"epoch": epoch, "step": step, "train_loss": stats.loss_sum / max(1, stats.seen),
                   "seen": stats.seen, "samples_used": stats.kept,
                   "kept_fraction": stats.kept / max(1, stats.seen),
                   "skipped_steps": stats.skipped_steps,
                   "elapsed_s": time.perf_counter() - t_start}
            if self.noisy is not None and np.isfinite(self._epoch_values).any():
                row.update(detection_metrics(self._epoch_values, self._epoch_kept, self.noisy))
            if cfg.eval_every_epoch or epoch == cfg.epochs - 1:
                last_eval = self._evaluate()
                row.update(last_eval)
            history.append(row)
            self.rec.log("epoch", **row)
            if self.save_scores:
                self.rec.save_scores(epoch, self._epoch_values, self._epoch_kept,
                                     noisy=self.noisy if epoch == 0 else None)
            if epoch in self.checkpoint_epochs:
                self.checkpoints.append({k: v.detach().cpu().clone()
                                         for k, v in self.model.state_dict().items()})
            all_values.append(self._epoch_values)
            all_kept.append(self._epoch_kept)
        if not last_eval or "test_acc" not in history[-1]:
            last_eval = self._evaluate()
        wall = time.perf_counter() - t_start
        peak, peak_kind = peak_memory_mb(self.device)
        seen = sum(r["seen"] for r in history)
        test_accs = [r["test_acc"] for r in history if "test_acc" in r] or [last_eval["test_acc"]]
        summary = {
            "status": "completed", "epochs": len(history), "steps": step,
            "strategy": cfg.strategy,
            "final_test_acc": last_eval["test_acc"], "best_test_acc": max(test_accs),
            "final_test_loss": last_eval["test_loss"], "final_val_loss": last_eval["val_loss"],
            "final_val_acc": last_eval["val_acc"],
            "samples_per_epoch": samples_per_epoch,
            "kept_fraction": sum(samples_per_epoch) / max(1, seen),
            "samples_seen": seen, "samples_removed": removed,
            "history": [{k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                        for r in history],
            "wall_time_s": wall, "cache_refresh_s": self._refresh_s,
            "peak_memory_mb": peak, "peak_memory_kind": peak_kind,
        }
        if self.noisy is not None and all_values and np.isfinite(np.stack(all_values)).any():
            # pooled over every scored (sample, epoch) pair
            summary.update(detection_metrics(np.concatenate(all_values),
                                             np.concatenate(all_kept),
                                             np.tile(self.noisy, len(all_values))))
        if step_evals:
            summary["step_evals"] = step_evals
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
