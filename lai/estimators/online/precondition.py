"""Adam-consistent scoring (paper App. E): score in the optimizer's preconditioned space.

Adam moves a parameter by ~ ``D^{-1/2} g`` (``D`` = bias-corrected second moment), so the
first-order change of the validation loss from one step on sample j is
``<g_V, D^{-1/2} g_j>`` rather than ``<g_V, g_j>``. Before the optimizer has state (the first
step) there is no preconditioner and scores are the plain SGD ones.
"""
from __future__ import annotations

import torch
from torch import nn


class AdamPreconditioner:
    """Reads ``1 / (sqrt(v_hat) + eps)`` from an Adam/AdamW optimizer's state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError("precondition=adam needs an Adam or AdamW optimizer "
                             f"(got {type(optimizer).__name__})")
        self.opt = optimizer
        self.group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def v_hat(self, p: torch.Tensor) -> torch.Tensor | None:
        """Bias-corrected second moment of ``p`` (same shape), or None before any step."""
        state = self.opt.state.get(p)
        if not state or "exp_avg_sq" not in state:
            return None
        group = self.group_of[id(p)]
        step = float(state["step"])
        return state["exp_avg_sq"] / (1.0 - group["betas"][1] ** step)

    def inv_sqrt(self, p: torch.Tensor) -> torch.Tensor | None:
        """Elementwise ``1 / (sqrt(v_hat) + eps)`` for ``p``, or None before any step."""
        v = self.v_hat(p)
        if v is None:
            return None
        return 1.0 / (v.sqrt() + self.group_of[id(p)]["eps"])

    def output_rows(self, layer: nn.Module) -> torch.Tensor | None:
        """``[K]`` scale per output unit of ``layer``: ``1 / (sqrt(mean_d v_hat[k, d]) + eps)``,
        the row-level aggregate of App. E (the output gradient has one entry per unit)."""
        v = self.v_hat(layer.weight)
        if v is None:
            return None
        rows = v.reshape(v.shape[0], -1).mean(1)
        if getattr(layer, "bias", None) is not None:
            vb = self.v_hat(layer.bias)
            if vb is not None:  # the bias is part of the same unit: average it in
                d = v[0].numel()
                rows = (rows * d + vb) / (d + 1)
        return 1.0 / (rows.sqrt() + self.group_of[id(layer.weight)]["eps"])
