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

Host synchronisation: a step waits for the device only where a decision needs a number from
it: whether anything was kept, for a policy that can drop a whole batch (the optimizer step is
skipped then), and which rows ``two_pass`` keeps, for a policy whose kept count depends on the
values. Everything that is only recorded (losses, kept counts, values, keep decisions) stays
on the device and is read every ``trainer.log_every`` steps and at the end of each epoch,
where one ``"step"`` record line sums up the steps since the last one.

Speed options (``lai.train.accel``): ``precision=bf16`` autocasts the forwards,
``channels_last`` lays image tensors out NHWC, ``compile`` compiles the hook-free forwards.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lai.batching import Batch, forward_logits, per_sample_loss
from lai.curate import Curator
from lai.config import TrainerConfig
from lai.estimators.registry import estimator_options
from lai.data.base import DataBundle
from lai.estimators.base import OnlineEstimator, VanillaEstimator
from lai.policies.base import Policy
from lai.train import distributed as dist_mod
from lai.train.accel import (autocast_context, compiled, to_channels_last,
                             wants_channels_last)
from lai.train.evaluate import evaluate
from lai.train.noisy import detection_metrics
from lai.train.optim import build_optimizer, build_scheduler
from lai.errors import RunInterrupted, TrainingDivergedError
from lai.train.loop_state import EpochPosition, LoopState, summary_of
from lai.train.stop import StopSignals
from lai.train.records import RunRecorder, _jsonable


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
    noisy_loss_sum: float = 0.0  # summed loss / count of the samples whose label is noisy
    noisy_seen: int = 0


@dataclass
class PendingSteps:
    """What the steps since the last flush recorded, still on the device.

    ``losses``/``kept``: one 0-d tensor per step (summed per-sample loss, kept count);
    ``kept_host``: kept counts already known on the host; ``values``/``keep``/``idx``:
    ``[B]`` tensors per scored step (``keep`` is None for an unscored step).
    """

    steps: int = 0
    seen: int = 0
    skipped: int = 0
    kept_host: int = 0
    losses: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    values: list = field(default_factory=list)
    keep: list = field(default_factory=list)
    idx: list = field(default_factory=list)
    all_kept_idx: list = field(default_factory=list)  # unscored steps, when scores are saved
    noisy_losses: list = field(default_factory=list)  # [loss sum, count] of noisy samples


class RegionTimer:
    """Total time spent in :meth:`region` blocks, in seconds.

    On CUDA it is the device time between two events recorded on the stream, so timing a
    region costs no host sync; the events are read by :meth:`total` (which waits for them).
    Elsewhere it is wall-clock time.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._events: list = []

    @contextmanager
    def region(self) -> Iterator[None]:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds += time.perf_counter() - t0
            return
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self._events.append((start, end))

    def total(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1e3
        self._events.clear()
        return self.seconds


class Trainer:
    """Trains ``model`` on ``data.train`` with online valuation; evaluates every epoch.

    ``fit()`` returns the summary dict (the runner writes it to ``summary.json``).
    ``train_rows`` restricts training to those training-set indices (two-round runners).
    """

    def __init__(self, model: nn.Module, data: DataBundle, estimator: OnlineEstimator,
                 policy: Policy, trainer_cfg: TrainerConfig, estimator_cfg: Any,
                 device: torch.device, recorder: RunRecorder, seed: int = 0,
                 save_scores: bool = False, train_rows: np.ndarray | None = None,
                 checkpoint_epochs: set[int] | None = None,
                 checkpoint_path: str | os.PathLike | None = None,
                 resume_state: dict | None = None):
        self.model, self.data, self.est, self.policy = model, data, estimator, policy
        # the estimator's options (a dataclass or a composed config node): what the curator
        # takes from them (validation draw, refresh period, preconditioning)
        self.curation = estimator_options(estimator_cfg).curation()
        self.cfg = trainer_cfg
        self.device, self.rec = device, recorder
        self.save_scores = save_scores
        self.rows = (np.arange(len(data.train)) if train_rows is None
                     else np.asarray(train_rows, dtype=np.int64))
        self.gen = torch.Generator().manual_seed(seed)
        self.scoring = not isinstance(estimator, VanillaEstimator)
        self.self_influence = bool(self.curation.get("self_influence", False))
        self.noisy = np.asarray(data.noisy, dtype=bool) if data.noisy is not None else None
        # on the device: each step sums the losses of its noisy-label samples without a sync
        self._noisy_t = (torch.as_tensor(self.noisy, device=device)
                         if self.noisy is not None else None)
        self.opt: torch.optim.Optimizer | None = None
        self.checkpoint_epochs = checkpoint_epochs or set()
        self.checkpoints: list[dict] = []  # CPU state_dicts at the end of checkpoint_epochs
        # resumable runs: the whole state is written here at the end of every epoch
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.resume_state = resume_state
        # speed options: all forwards (the estimator's own too) run in `self._autocast()`;
        # forwards without estimator hooks run `self.fwd_model` (compiled when asked)
        self._autocast = autocast_context(device, trainer_cfg.precision)
        self.channels_last = wants_channels_last(trainer_cfg.channels_last, model, device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.fwd_model = compiled(self.model, bool(trainer_cfg.compile))
        self.log_every = max(1, int(trainer_cfg.log_every))
        self._pending = PendingSteps()
        self._refresh_timer = RegionTimer(device)
        self._in_train_mode = False  # model.train() has run in a step (see train_step)
        self.dist = dist_mod.current()  # data-parallel ranks (lai/train/distributed.py)
        self.state = LoopState()  # the loop's records (fit); checkpointed with the model
        self._position: EpochPosition | None = None  # set while a mid-epoch checkpoint saves
        self._t_start = time.perf_counter()
        # the curation itself (estimator, policy, validation draws, the step's scoring) is
        # the public lai.Curator: run.py and a user's own loop share one mechanism
        self.curator = Curator(
            model, None if self.self_influence else data.val, estimator, policy,
            **{k: v for k, v in self.curation.items() if k != "precondition"},
            strategy=trainer_cfg.strategy, seed=seed + 1, forward_context=self._autocast,
            refresh_context=lambda: self._refresh_timer.region(),
            after_refresh=lambda est: dist_mod.reduce_cache(est, self.dist),
            val_transform=self._val_transform, shard=self.dist.shard)
        self.val_gen = (self.curator.val.gen if self.curator.val is not None
                        else torch.Generator().manual_seed(seed + 1))

    # ---- inputs ----------------------------------------------------------------------
    def _prepare(self, inputs: Any, train: bool) -> Any:
        """Dataset preprocessing (on the device), then the memory layout the model wants."""
        x = self.data.preprocess(inputs, train)
        return to_channels_last(x) if self.channels_last else x

    def _to_device(self, batch: Batch) -> Batch:
        # pinned memory: the copy overlaps the previous step instead of waiting for it
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    # ---- validation cache ------------------------------------------------------------
    def _val_transform(self, batch: Batch) -> Batch:
        """A validation draw on the device, preprocessed as evaluation batches are."""
        batch = self._to_device(batch)
        return Batch(self._prepare(batch.inputs, False), batch.labels, batch.idx)

    def _refresh(self, batch: Batch | None = None) -> None:
        """Rebuild the cache from ``batch`` (default: a fresh validation draw); the time spent
        is added to ``self._refresh_timer`` (device time on CUDA, no host sync)."""
        self.curator.refresh(batch)

    # ---- one step ----------------------------------------------------------------------
    def _update(self, losses: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Backward of the weighted mean of per-sample ``losses`` [B] (plain mean without
        weights); optimizer step."""
        self._backward(losses, weights)
        self._optimizer_step()

    def _backward(self, losses: torch.Tensor,
                  weights: torch.Tensor | None) -> torch.Tensor | float:
        """Backward of the weighted mean of ``losses`` (gradients not yet summed over ranks);
        returns each sample's coefficient in the loss (``[B]``, or a number when shared)."""
        if self.dist.enabled:  # the one-process weighted mean, once gradients are summed
            total = losses.sum() if weights is None else (weights * losses).sum()
            denom = (weights.detach().sum() if weights is not None
                     else losses.new_tensor(float(losses.shape[0])))
            denom = self.dist.sum_(denom.clone())
            loss = total / denom
            coef = 1.0 / denom if weights is None else weights.detach() / denom
        elif weights is None:
            loss, coef = losses.mean(), 1.0 / losses.shape[0]
        else:
            denom = weights.sum()
            loss, coef = (weights * losses).sum() / denom, weights.detach() / denom.detach()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return coef

    def _optimizer_step(self) -> None:
        dist_mod.sum_gradients(self.model, self.dist)
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()

    def train_step(self, raw: Batch, epoch: int, step: int) -> None:
        """One optimizer step on ``raw`` (on the device), in one of three strategies: the
        values after the backward (Ghost's probe form), two passes (score, then train the
        kept rows), or one weighted pass. What it records stays pending on the device until
        :meth:`_flush`. (``fit`` calls it; so does the benchmark, after :meth:`setup`.)"""
        batch = Batch(self._prepare(raw.inputs, True), raw.labels, raw.idx)
        # train mode for every module, set by the first step; later steps find it set unless
        # something switched the model (evaluation, a refresh in eval mode: both switch and
        # restore the whole model), so the walk over all modules is not paid at every step
        if not (self._in_train_mode and self.model.training):
            self.model.train()
            self._in_train_mode = True
        # the periodic refresh is fit()'s (before the step); self-influence refreshes here
        st = self.curator.step(batch, epoch, step, refresh=False)
        with st:  # the estimator's hooks ride on this forward (a no-grad one for two_pass)
            with self._autocast():
                logits = forward_logits(self.model if st.hooked else self.fwd_model,
                                        batch.inputs)
        if st.two_pass:
            # a no-grad forward's logits can still be a grad leaf (the estimator's hooks make
            # the output layer's output one): detached, the recorded loss builds no graph
            logits = logits.detach()
        # computed once: it feeds the backward (one pass) and the record
        losses = per_sample_loss(logits.float(), batch.labels)
        # two pass: the scoring pass's logits have given the losses: gone before the second
        # pass instead of held through its peak (an LM's [B, T, vocab])
        del logits
        if st.late:
            self._step_then_score(st, losses)
        elif st.two_pass:
            self._step_on_kept_rows(st, batch)
        else:
            self._step_weighted(st, losses)
        self.sched.step()
        self._record_step(raw, losses, st)

    def _step_then_score(self, st: Any, losses: torch.Tensor) -> None:
        """Every sample trains with weight 1 (planned so): backward, then the values."""
        st.set_row_scale(self._backward(losses, None))
        _ = st.values  # read from the backward's probes before the optimizer step
        self._optimizer_step()
        self._pending.kept_host += len(losses)

    def _step_on_kept_rows(self, st: Any, batch: Batch) -> None:
        """Two pass: forward + backward on the kept rows only."""
        rows, weights = st.kept_rows, st.weights
        sub, w = (batch, weights) if rows is None else (batch.select(rows), weights[rows])
        if len(sub) > 0:
            with self._autocast():
                sub_logits = forward_logits(self.fwd_model, sub.inputs)
            self._update(per_sample_loss(sub_logits.float(), sub.labels), w)
        else:
            self._pending.skipped += 1
        self._pending.kept_host += len(sub)

    def _step_weighted(self, st: Any, losses: torch.Tensor) -> None:
        """One pass: the weighted loss of the batch (weight 0 = dropped); a batch with
        nothing kept skips the optimizer step, which needs the count on the host."""
        p, weights, keep = self._pending, st.weights, st.keep
        if weights is None:
            self._update(losses, None)
            p.kept_host += len(losses)
        elif self.policy.may_drop_all:
            kept = int(keep.sum())  # host sync: a batch with nothing kept skips the step
            if (kept if not self.dist.enabled
                    else int(self.dist.sum_(keep.sum().reshape(1).double()).item())) > 0:
                self._update(losses, weights)
            else:
                p.skipped += 1
            p.kept_host += kept
        else:
            self._update(losses, weights)
            p.kept.append(keep.sum())

    def _record_step(self, raw: Batch, losses: torch.Tensor, st: Any) -> None:
        """The step's losses, values and keep decisions, pending on the device."""
        p = self._pending
        p.steps += 1
        p.seen += len(losses)
        p.losses.append(losses.detach().sum())
        if self._noisy_t is not None and raw.idx is not None:
            nz = self._noisy_t[raw.idx.to(self._noisy_t.device)].to(losses.dtype)
            p.noisy_losses.append(torch.stack([(losses.detach() * nz).sum(), nz.sum()]))
        values = st.values
        if values is not None:
            p.values.append(values.detach())
            p.keep.append(st.keep)
            p.idx.append(raw.idx)
        elif self.save_scores:
            p.all_kept_idx.append(raw.idx)

    def _flush(self, epoch: int, step: int, stats: EpochStats, bar: Any = None) -> None:
        """Read the pending per-step statistics (one wait for the device), add them to
        ``stats`` and the epoch's score arrays, and write one ``"step"`` record line:
        ``loss`` = mean per-sample loss, ``kept``/``batch`` = totals over its ``steps``."""
        p = self._pending
        if p.steps == 0:
            return
        self._pending = PendingSteps()
        self._refresh_timer.total()  # read the finished refresh timings: keeps the list short
        loss_sum = float(torch.stack(p.losses).double().sum())
        kept = p.kept_host + (int(torch.stack(p.kept).sum()) if p.kept else 0)
        value_sum = value_n = 0.0
        if p.values:
            idx = torch.cat(p.idx).cpu().numpy()
            vals = torch.cat(p.values).float().cpu().numpy()
            self._epoch_values[idx] = vals
            self._epoch_kept[idx] = torch.cat(p.keep).cpu().numpy()
            value_sum, value_n = float(vals.astype(np.float64).sum()), float(len(vals))
        if self.dist.enabled:  # records count every rank's samples (skips are decided jointly)
            sums = self.dist.sum_(torch.tensor([loss_sum, kept, p.seen, value_sum, value_n],
                                               dtype=torch.float64)).tolist()
            loss_sum, kept, p.seen, value_sum, value_n = sums[0], int(sums[1]), int(sums[2]), \
                sums[3], sums[4]
        noisy_sum, noisy_n = (torch.stack(p.noisy_losses).double().sum(0).tolist()
                              if p.noisy_losses else (0.0, 0.0))
        if self.dist.enabled and self._noisy_t is not None:
            noisy_sum, noisy_n = self.dist.sum_(torch.tensor([noisy_sum, noisy_n],
                                                             dtype=torch.float64)).tolist()
        value_mean = value_sum / value_n if value_n else None
        if not math.isfinite(loss_sum):
            self._diverged(epoch, step, p.steps, loss_sum)
        if p.all_kept_idx:
            self._epoch_kept[torch.cat(p.all_kept_idx).cpu().numpy()] = 1
        stats.loss_sum += loss_sum
        stats.seen += p.seen
        stats.kept += kept
        stats.steps += p.steps
        stats.skipped_steps += p.skipped
        stats.noisy_loss_sum += noisy_sum
        stats.noisy_seen += int(noisy_n)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / p.seen:.3f}", kept=f"{kept}/{p.seen}")
        self.rec.log("step", step=step, epoch=epoch, lr=self.sched.get_last_lr()[0],
                     steps=p.steps, loss=loss_sum / p.seen, kept=kept, batch=p.seen,
                     skipped_steps=p.skipped, value_mean=value_mean)

    # ---- set-up ----------------------------------------------------------------------
    def setup(self, total_steps: int, steps_per_epoch: int = 1) -> None:
        """Optimizer, schedule over ``total_steps``, empty records: what :meth:`train_step`
        needs (``fit`` calls it; so does the benchmark, which drives ``train_step`` itself)."""
        self.opt = build_optimizer(self.model, self.cfg)
        self.curator.bind_optimizer(self.opt, self.curation.get("precondition", "none"))
        self.sched = build_scheduler(self.opt, self.cfg, total_steps, steps_per_epoch)
        self._pending = PendingSteps()
        self._refresh_timer = RegionTimer(self.device)
        self._new_epoch()

    def _new_epoch(self) -> None:
        n_train = len(self.data.train)
        self._epoch_values = np.full(n_train, np.nan, dtype=np.float32)
        self._epoch_kept = np.full(n_train, -1, dtype=np.int8)

    # ---- the whole run -----------------------------------------------------------------
    def fit(self) -> dict:
        """Train every epoch (resuming from ``resume_state`` when given); returns the
        summary. Ctrl-C or SIGTERM stops it between two steps with a checkpoint
        (:class:`lai.errors.RunInterrupted`)."""
        cfg = self.cfg
        if self.dist.enabled and self.scoring and cfg.strategy != "one_pass":
            raise ValueError("data-parallel runs need trainer.strategy=one_pass")
        steps_per_epoch = math.ceil(len(self.rows) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            total = min(total, int(cfg.max_steps))
        self.setup(total, steps_per_epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.state, position = LoopState(), None
        if self.resume_state is not None:
            self.state = self.load_state_dict(self.resume_state)
            position = EpochPosition.from_state_dict(self.resume_state.get("in_epoch"))
        self._t_start = time.perf_counter() - self.state.elapsed_s
        self.checkpoints = []
        self.curator.cache_ready = False  # no validation cache yet in this process
        with StopSignals(enabled=not self.dist.enabled) as stop:
            for epoch in range(self.state.next_epoch, cfg.epochs):
                if self.state.step >= total:
                    break
                stats, order, first = self._begin_epoch(position)
                position = None
                self._run_steps(epoch, order, range(first, steps_per_epoch), stats, total, stop)
                self._end_epoch(epoch, stats)
                if stop.received and epoch + 1 < cfg.epochs and self.state.step < total:
                    raise RunInterrupted(stop.received, self.checkpoint_path)
        return self._summary()

    # ---- the pieces of fit -------------------------------------------------------------
    def _begin_epoch(self, position: EpochPosition | None
                     ) -> tuple[EpochStats, torch.Tensor, int]:
        """The epoch's statistics, sample order and first batch index: new, or where a
        checkpoint inside the epoch left them."""
        self._new_epoch()
        if position is None:
            order = torch.as_tensor(self.rows)[torch.randperm(len(self.rows),
                                                              generator=self.gen)]
            return EpochStats(), order, 0
        self._epoch_values, self._epoch_kept = position.epoch_values, position.epoch_kept
        return EpochStats(**json.loads(position.stats)), position.order, position.i

    def _run_steps(self, epoch: int, order: torch.Tensor, batches: range, stats: EpochStats,
                   total: int, stop: StopSignals) -> None:
        """The optimizer steps of one epoch (batch indices ``batches`` of ``order``), with
        the records, evaluations and checkpoints due between them."""
        cfg, state, bs = self.cfg, self.state, self.cfg.batch_size
        eval_at = {int(s) for s in cfg.eval_at_steps}
        ckpt_every = int(cfg.checkpoint_every or 0)
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress,
                   leave=False, dynamic_ncols=True)
        for i in bar:
            if state.step >= total:
                break
            # also the first scored step (after a resume or warm-up)
            self.curator.refresh_if_due(state.step, epoch)
            rows = self.dist.shard(order[i * bs:(i + 1) * bs])  # this rank's share
            self.train_step(self._to_device(self.data.train.gather(rows)), epoch, state.step)
            state.step += 1
            step = state.step
            if step % self.log_every == 0 or step in eval_at:
                self._flush(epoch, step, stats, bar)
            if step in eval_at:  # e.g. Table 1's perplexity after 5,000 and 10,000 batches
                state.step_evals[str(step)] = {
                    "removed_so_far": state.removed + stats.seen - stats.kept,
                    **self._evaluate()}
                self.rec.log("step_eval", step=step, **state.step_evals[str(step)])
            inside = i + 1 < batches.stop and step < total  # more steps in this epoch
            due = ckpt_every and step % ckpt_every == 0
            if inside and (due or stop.received) and self.checkpoint_path is not None:
                self._flush(epoch, step, stats, bar)
                self._epoch_values, self._epoch_kept = dist_mod.merge_epoch_arrays(
                    self._epoch_values, self._epoch_kept, self.dist)
                self.state.next_epoch = epoch
                self._position = EpochPosition(i + 1, order, json.dumps(vars(stats)),
                                               self._epoch_values, self._epoch_kept)
                self.save_checkpoint(self.checkpoint_path)
                self._position = None
            if inside and stop.received:
                bar.close()
                raise RunInterrupted(stop.received, self.checkpoint_path)
        self._flush(epoch, state.step, stats, bar)
        bar.close()

    def _end_epoch(self, epoch: int, stats: EpochStats) -> None:
        """Records of a finished epoch (its history row, evaluation, scores), then the
        checkpoint."""
        state = self.state
        self._epoch_values, self._epoch_kept = dist_mod.merge_epoch_arrays(
            self._epoch_values, self._epoch_kept, self.dist)
        state.samples_per_epoch.append(stats.kept)
        state.removed += stats.seen - stats.kept
        row = self._epoch_row(epoch, stats)
        if self.cfg.eval_every_epoch or epoch == self.cfg.epochs - 1:
            state.last_eval = self._evaluate()
            row.update(state.last_eval)
        state.history.append(row)
        self.rec.log("epoch", **row)
        if self.save_scores:
            self.rec.save_scores(epoch, self._epoch_values, self._epoch_kept,
                                 noisy=self.noisy if epoch == 0 else None)
        if epoch in self.checkpoint_epochs:
            self.checkpoints.append({k: v.detach().cpu().clone()
                                     for k, v in self.model.state_dict().items()})
        state.all_values.append(self._epoch_values)
        state.all_kept.append(self._epoch_kept)
        state.next_epoch = epoch + 1
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)

    def _epoch_row(self, epoch: int, stats: EpochStats) -> dict:
        """The history row of a finished epoch (before its evaluation)."""
        row = {"epoch": epoch, "step": self.state.step,
               "train_loss": stats.loss_sum / max(1, stats.seen),
               "seen": stats.seen, "samples_used": stats.kept,
               "kept_fraction": stats.kept / max(1, stats.seen),
               "skipped_steps": stats.skipped_steps,
               "elapsed_s": time.perf_counter() - self._t_start}
        if self.noisy is not None and stats.seen > 0:
            # how far the model fits the labels it is given: memorised noisy labels
            # have a training loss near the clean ones' (measured at each forward)
            clean_n = stats.seen - stats.noisy_seen
            row["train_loss_noisy"] = (stats.noisy_loss_sum / stats.noisy_seen
                                       if stats.noisy_seen else None)
            row["train_loss_clean"] = ((stats.loss_sum - stats.noisy_loss_sum) / clean_n
                                       if clean_n else None)
        if self.noisy is not None and np.isfinite(self._epoch_values).any():
            row.update(detection_metrics(self._epoch_values, self._epoch_kept, self.noisy))
        row.update(self._kept_classes(epoch))
        return row

    def _summary(self) -> dict:
        """The run's summary from the loop's records (``status: completed``)."""
        state, history = self.state, self.state.history
        if not state.last_eval or "test_acc" not in history[-1]:
            state.last_eval = self._evaluate()
        wall = time.perf_counter() - self._t_start
        peak, peak_kind = peak_memory_mb(self.device)
        seen = sum(r["seen"] for r in history)
        summary = {
            "status": "completed", "epochs": len(history), "steps": state.step,
            "strategy": self.cfg.strategy, **summary_of(history, state.last_eval),
            "samples_per_epoch": state.samples_per_epoch,
            "kept_fraction": sum(state.samples_per_epoch) / max(1, seen),
            "samples_seen": seen, "samples_removed": state.removed,
            "skipped_steps": sum(r["skipped_steps"] for r in history),
            "history": [{k: v for k, v in r.items() if not isinstance(v, (list, dict))}
                        for r in history],
            "wall_time_s": wall, "cache_refresh_s": self._refresh_timer.total(),
            "peak_memory_mb": peak, "peak_memory_kind": peak_kind,
        }
        if self.noisy is not None and state.all_values and \
                np.isfinite(np.stack(state.all_values)).any():
            # pooled over every scored (sample, epoch) pair
            summary.update(detection_metrics(np.concatenate(state.all_values),
                                             np.concatenate(state.all_kept),
                                             np.tile(self.noisy, len(state.all_values))))
        collapsed = [r["epoch"] for r in history if r.get("collapsed")]
        if collapsed:
            summary["collapsed_epochs"] = collapsed
        if state.step_evals:
            summary["step_evals"] = state.step_evals
        if "test_ppl" in state.last_eval:
            summary["final_test_ppl"] = state.last_eval["test_ppl"]
            summary["final_val_ppl"] = state.last_eval["val_ppl"]
        return summary

    # ---- failure and checkpoints -------------------------------------------------------
    def _diverged(self, epoch: int, step: int, steps: int, loss_sum: float) -> None:
        """A non-finite loss: save the state beside the checkpoint, then stop the run."""
        where = ""
        if self.checkpoint_path is not None:
            path = os.path.join(os.path.dirname(self.checkpoint_path), "diverged_state.pt")
            self.state.extra["diverged_at_step"] = step
            self.save_checkpoint(path)
            where = f"; state saved to {path}"
        raise TrainingDivergedError(
            f"non-finite training loss ({loss_sum}) in steps {step - steps + 1}..{step} of "
            f"epoch {epoch}; lower trainer.lr or set trainer.grad_clip{where}")

    def state_dict(self) -> dict:
        """Everything needed to go on from here (the end of the last finished epoch, or a
        position inside the current one), as tensors, numbers, strings and lists only
        (loadable with ``torch.load(weights_only=True)``)."""
        nps = np.random.get_state()
        state = {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "gen": self.gen.get_state(), "val_gen": self.val_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": [nps[0], torch.from_numpy(nps[1].astype(np.int64)), int(nps[2]),
                          int(nps[3]), float(nps[4])],
            "python_rng": json.dumps(random.getstate()),
            "policy": {k: v for k, v in vars(self.policy).items()
                       if v is None or isinstance(v, (bool, int, float, str, torch.Tensor))},
            "cache_refresh_s": self._refresh_timer.total(),
            **self.state.state_dict(elapsed_s=time.perf_counter() - self._t_start),
            "metrics_bytes": self.rec.metrics_bytes(),
        }
        if self._position is not None:  # a checkpoint inside an epoch
            state["in_epoch"] = self._position.state_dict()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self, path: str) -> None:
        """Write :meth:`state_dict` atomically (a kill never leaves a half-written file)."""
        state = self.state_dict()
        if self.dist.rank != 0:  # rank 0 writes for all (every rank holds the same state)
            return
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_state_dict(self, state: dict) -> LoopState:
        """Restore a :meth:`state_dict` (after :meth:`setup`); returns the loop's records."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["gen"])
        self.val_gen.set_state(state["val_gen"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = json.loads(state["python_rng"])
        random.setstate((version, tuple(internal), gauss))
        for k, v in state["policy"].items():
            setattr(self.policy, k, v.to(self.device) if torch.is_tensor(v) else v)
        self._refresh_timer.seconds = float(state["cache_refresh_s"])
        return LoopState.from_state_dict(state)

    def _kept_classes(self, epoch: int) -> dict:
        """``{"kept_classes": k}`` for a classification run that curated in ``epoch``: how
        many classes its kept samples cover. A curation that kept one class only (or none)
        for the whole epoch has collapsed; it is recorded and printed, not hidden."""
        labels = self.data.train.labels
        if (self.data.task != "classification" or labels.dim() != 1
                or not self.policy.active(epoch) or not (self._epoch_kept >= 0).any()):
            return {}
        kept = self._epoch_kept == 1
        classes = np.unique(labels.cpu().numpy()[kept]) if kept.any() else np.array([])
        seen = np.unique(labels.cpu().numpy()[self._epoch_kept >= 0])
        out = {"kept_classes": int(len(classes))}
        if len(seen) > 1 and len(classes) <= 1:
            what = f"class {int(classes[0])} only" if len(classes) else "no sample"
            out["collapsed"] = True
            self.rec.log("collapse", epoch=epoch, kept=what)
            print(f"warning: curation collapsed in epoch {epoch}: it kept {what} of the "
                  f"{len(seen)} classes it saw", flush=True)
        return out

    def _evaluate(self) -> dict:
        out = {}
        ebs = self.cfg.eval_batch_size
        for split_name in ("val", "test"):
            res = evaluate(self.fwd_model, getattr(self.data, split_name), self.data, self.device,
                           ebs, forward_context=self._autocast,
                           channels_last=self.channels_last)
            out.update({f"{split_name}_{k}": v for k, v in res.items() if k != "n"})
        return out
