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


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps, then ``constant``, ``cosine`` (to 0 at ``total``) or
    ``linear`` (to 0 at ``total``).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}; use constant | cosine | linear")


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainerConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step scheduler; call ``.step()`` after every optimizer step."""
    lr_factor(0, total_steps, cfg.warmup_steps, cfg.schedule)  # fail early on a bad name
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, cfg.warmup_steps, cfg.schedule))
