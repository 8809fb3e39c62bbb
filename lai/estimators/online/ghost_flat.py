"""Ghost as the paper's public code computes it: flattened whole-layer activations and output
gradients. An approximation, kept to compare with; :mod:`lai.estimators.online.ghost` is exact.

For every ``nn.Linear`` and ``nn.Conv2d`` layer ``l`` with input ``a_l`` and output ``s_l``,
each flattened per sample (all positions, channels and features in one vector),

    v_j = sum_{z in V} sum_l (<a_l(j), a_l(z)> + [l has a bias]) * <g_l(j), g_l(z)>,
    g_l(x) = d ell_x / d s_l(x).

Where a sample's layer input is one vector (an MLP, a classification head) the term is the
exact inner product of the layer's per-sample weight and bias gradients, and the sum equals
exact Ghost for a model made of such layers only. Where the layer is applied at several
positions (tokens of a sequence, pixels of a convolution) the per-sample weight gradient is
``sum_t a_t g_t^T`` and its inner product is ``sum_{t,u} <a_t, a'_u> <g_t, g'_u>``; the
flattened product ``(sum_t <a_t, a'_t>)(sum_u <g_u, g'_u>)`` is not that (and for a
convolution its two factors do not even range over the same positions). Parameters of other
modules (embeddings, norms) are left out. Sign: positive = helps, as everywhere here.
"""
from __future__ import annotations

import torch
from torch import nn

from lai.batching import Batch, forward_logits, per_sample_loss
from lai.estimators.capture import preserved_buffers


def _layer_signals(model: nn.Module, batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                 bool]]:
    """Per layer ``(a [B, -1], g [B, -1], has_bias)``: flattened inputs and output gradients
    of every trainable ``nn.Linear`` / ``nn.Conv2d`` for ``batch`` (model in its own mode)."""
    b = len(batch)
    inputs, outputs, handles = [], [], []

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        inputs.append((args[0].detach(), mod.bias is not None and mod.bias.requires_grad))
        outputs.append(out)

    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.requires_grad:
            handles.append(mod.register_forward_hook(hook))
    if not handles:
        raise ValueError("the model has no trainable nn.Linear or nn.Conv2d layer")
    try:
        with torch.enable_grad():
            loss = per_sample_loss(forward_logits(model, batch.inputs), batch.labels).sum()
            grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    signals = []
    for (a, has_bias), s, g in zip(inputs, outputs, grads):
        if g is None:  # the layer does not reach the loss
            continue
        # rows of a layer fed [B * T, D] (OPT's fc1/fc2) are read batch-major
        signals.append((a.reshape(b, -1), g.detach().reshape(b, -1), has_bias))
    return signals


def flattened_ghost_values(model: nn.Module, train: Batch, val: Batch) -> torch.Tensor:
    """``[len(train)]`` values of the paper code's flattened Ghost (see the module docstring)
    against the validation batch; the model's parameters and buffers are left unchanged."""
    with preserved_buffers(model):
        tr = _layer_signals(model, train)
        va = _layer_signals(model, val)
    if len(tr) != len(va):
        raise ValueError("the model ran different layers on the training and validation "
                         "batches; the flattened Ghost needs the same layers for both")
    total = None
    for (a, g, bias), (av, gv, _) in zip(tr, va):
        alpha = a @ av.T + (1.0 if bias else 0.0)  # [B, V]
        term = (alpha * (g @ gv.T)).sum(1)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no trainable nn.Linear or nn.Conv2d layer")
    return total
