"""Optimisers and per-step learning-rate schedules (paper App. D settings live in conf/trainer)."""
from __future__ import annotations

import math

import torch
from torch import nn

from lai.config import TrainerConfig


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                   weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use sgd | adam | adamw")


SCHEDULES = ("constant", "cosine", "linear", "warm_restarts")


def warm_restart_factor(epoch: int, period: int, mult: int) -> float:
    """``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(T_0=period, T_mult=mult,
    eta_min=0)`` stepped once per epoch: the factor of epoch ``epoch`` (0-based). Cycles last
    ``period``, ``period * mult``, ... epochs; each starts at 1 and decays by a half cosine."""
    length, start = period, 0
    while epoch >= start + length:
        start += length
        length *= mult
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / length))


def lr_factor(step: int, total: int, warmup: int, schedule: str, steps_per_epoch: int = 1,
              restart_epochs: int = 10, restart_mult: int = 2) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps, then ``constant``, ``cosine`` (to 0 at ``total``),
    ``linear`` (to 0 at ``total``) or ``warm_restarts`` (:func:`warm_restart_factor` of the
    step's epoch, as the paper's public code schedules CIFAR: ``T_0=10, T_mult=2``).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "warm_restarts":
        return warm_restart_factor(step // max(1, steps_per_epoch), restart_epochs,
                                   restart_mult)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}; use {' | '.join(SCHEDULES)}")


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainerConfig, total_steps: int,
                    steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler; call ``.step()`` after every optimizer step."""
    def factor(s: int) -> float:
        return lr_factor(s, total_steps, cfg.warmup_steps, cfg.schedule, steps_per_epoch,
                         cfg.restart_epochs, cfg.restart_mult)

    factor(0)  # fail early on a bad name
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
