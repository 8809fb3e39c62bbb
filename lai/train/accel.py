"""Speed options of the training loop: bf16 autocast, channels-last, ``torch.compile``.

None of them changes what the estimators compute in fp32:

- ``precision="bf16"`` runs the *forwards* (training, scoring, validation cache, evaluation)
  under ``torch.autocast(bfloat16)``. Everything after a forward stays fp32: the per-sample
  losses (``per_sample_loss(logits.float())``), the output gradients, the validation cache and
  the values. The estimators' hook arithmetic inside a forward runs with autocast switched off
  (``lai.estimators.capture.fp32_math``), so only the layer inputs carry bf16 rounding.
- ``channels_last`` stores the model's 4-D weights and the image batches in NHWC order. It is a
  memory layout only: every tensor keeps its logical NCHW shape and values, so LAI's layer
  inputs flatten to the same rows.
- ``compile`` wraps the model with ``torch.compile`` for the forwards that carry no estimator
  hooks (vanilla steps, the second pass of ``two_pass``, evaluation). Hooked forwards (LAI's
  layer taps, Ghost's dual parameters) run the eager model, which shares the parameters and
  buffers: the hooks are set up anew for every forward and call back into Python, which a
  compiled graph would have to re-trace or break on.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch
from torch import nn

ForwardContext = Callable[[], AbstractContextManager]


def autocast_context(device: torch.device, precision: str) -> ForwardContext:
    """A zero-argument factory of the context to run forwards in (``nullcontext`` for fp32)."""
    if precision == "fp32":
        return nullcontext
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be fp32 | bf16, got {precision!r}")


def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def wants_channels_last(setting: bool | str, model: nn.Module, device: torch.device) -> bool:
    """``auto`` -> on for models with an ``nn.Conv2d`` on CUDA (where cuDNN's NHWC kernels are
    faster, above all under bf16); ``True``/``False`` as given."""
    if setting == "auto":
        return device.type == "cuda" and has_conv2d(model)
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"channels_last must be true | false | auto, got {setting!r}")


def to_channels_last(inputs: Any) -> Any:
    """4-D floating image batches -> channels-last memory format; anything else unchanged."""
    if torch.is_tensor(inputs) and inputs.dim() == 4 and inputs.is_floating_point():
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(model)`` when enabled (parameters and buffers shared), else ``model``."""
    return torch.compile(model) if enabled else model
