"""Curated fine-tuning with the Hugging Face ``transformers.Trainer`` users already run.

    from lai.integrations.hf_trainer import CuratedTrainer, CurationArguments

    trainer = CuratedTrainer(model=model, args=TrainingArguments(...),
                             train_dataset=train, data_collator=collator,
                             curation=CurationArguments(val_dataset=val, method="lai",
                                                        policy="threshold", start_epoch=1))
    trainer.train()

Each training batch is curated by a :class:`lai.Curator` whose hooks ride on the Trainer's
own forward (``compute_loss``): the loss is the weighted mean of the per-sample losses over the
kept rows. Everything else is the Trainer's: ``TrainingArguments`` as usual (gradient
accumulation divides the curated loss like any other, fp32/bf16 autocast also wraps the
validation-cache forwards, evaluation and checkpoints are untouched). The share of samples
kept since the last log goes into the Trainer's own logs as ``kept_fraction``.

Labels follow the model's convention (a causal LM's are its input ids, shifted inside; see
:func:`lai.batching.resolve_labels`). Ghost runs in its forward form (values before the
backward), which any loss scaling leaves exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from transformers import Trainer

from lai.batching import Batch, as_batch, resolve_labels
from lai.curate import Curator


@dataclass
class CurationArguments:
    """What to curate with. ``val_dataset``: clean validation examples (the same format as
    the training dataset; collated by the Trainer's ``data_collator``); each cache refresh
    draws ``val_fraction`` of them (at most ``val_max``) every ``refresh_every`` optimizer
    micro-steps. ``policy_options``: the policy's own options (``threshold``,
    ``keep_fraction``, ...); ``start_epoch``: epochs trained on every sample first."""

    val_dataset: Any = None
    method: str = "lai"
    policy: str = "threshold"
    policy_options: dict = field(default_factory=dict)
    start_epoch: int = 0
    val_fraction: float = 0.1
    val_max: Optional[int] = None
    refresh_every: int = 1
    val_mode: str = "eval"
    strategy: str = "one_pass"
    seed: int = 0
    estimator_options: dict = field(default_factory=dict)


class _CollatedSplit:
    """A dataset seen as the Curator's validation split: ``gather(rows)`` collates the rows
    with the Trainer's collator and puts them on its device, labels aligned for the model."""

    def __init__(self, dataset: Any, trainer: "CuratedTrainer"):
        self.dataset, self.trainer = dataset, trainer

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, rows: torch.Tensor) -> Batch:
        raw = self.trainer.data_collator([self.dataset[int(i)] for i in rows])
        raw = self.trainer._prepare_inputs(raw)
        model = self.trainer.model
        return resolve_labels(model, raw, as_batch(dict(raw)), "auto")


class CuratedTrainer(Trainer):
    """A ``transformers.Trainer`` that curates every training batch (see the module
    docstring); ``curation``: a :class:`CurationArguments`. ``trainer.curator`` is the
    :class:`lai.Curator`; ``trainer.last_step`` the last :class:`lai.CurationStep`."""

    def __init__(self, *args: Any, curation: Optional[CurationArguments] = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if curation is None:
            raise ValueError("CuratedTrainer needs curation=CurationArguments(...)")
        c = curation
        options = dict(c.estimator_options)
        if str(c.method).lower() == "ghost":
            options.setdefault("ghost_mode", "forward")
        val = _CollatedSplit(c.val_dataset, self) if c.val_dataset is not None else None
        self.curator = Curator(
            self.model, val, c.method, c.policy, policy_options=c.policy_options,
            start_epoch=c.start_epoch, val_fraction=c.val_fraction, val_max=c.val_max,
            refresh_every=c.refresh_every, val_mode=c.val_mode, strategy=c.strategy,
            seed=c.seed, forward_context=self.autocast_smart_context_manager, **options)
        # the curated loss is a mean over the kept rows, not a sum to be divided by the
        # number of items in the batch: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.last_step = None
        self._kept = self._seen = 0

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        if return_outputs or not model.training:  # evaluation: the model's own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        epoch = int(self.state.epoch or 0)
        step = self.curator.step(dict(inputs), epoch=epoch)
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        with step:
            outputs = model(**forward)
        if step.two_pass:
            kept = step.kept_batch.inputs
            outputs = model(**kept)
        loss = step.loss(outputs)
        self.last_step = step
        n = len(step.batch)
        self._seen += n
        self._kept += n if step.keep is None else int(step.keep.sum())
        return loss

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if self._seen and "loss" in logs:
            logs["kept_fraction"] = self._kept / self._seen
            self._kept = self._seen = 0
        super().log(logs, start_time)
