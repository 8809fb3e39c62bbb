"""Evaluation of a model on a split: loss and accuracy (token-level for language models)."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import nn

from lai.batching import IGNORE_INDEX, forward_logits
from lai.data.base import DataBundle, TensorSplit
from lai.train.accel import to_channels_last


@torch.no_grad()
def evaluate(model: nn.Module, split: TensorSplit, data: DataBundle, device: torch.device,
             batch_size: int, forward_context: Callable[[], AbstractContextManager] = nullcontext,
             channels_last: bool = False) -> dict:
    """Mean loss and accuracy over ``split`` in eval mode (the mode is restored afterwards).

    Classification: ``loss`` = mean cross-entropy per sample, ``acc`` in [0, 1].
    Language modelling: ``loss`` = mean cross-entropy per token, ``ppl = exp(loss)``,
    ``acc`` = next-token accuracy. ``forward_context`` wraps the forwards (e.g. bf16
    autocast; the loss is fp32), ``channels_last`` lays image batches out NHWC.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(split), batch_size):
            rows = torch.arange(start, min(len(split), start + batch_size))
            batch = split.gather(rows).to(device, non_blocking=True)
            inputs = data.preprocess(batch.inputs, False)
            with forward_context():
                logits = forward_logits(model, to_channels_last(inputs) if channels_last
                                        else inputs)
            logits = logits.float()
            labels = batch.labels
            if logits.dim() == 3:
                flat, y = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
                keep = y != IGNORE_INDEX
                flat, y = flat[keep], y[keep]
            else:
                flat, y = logits, labels
            total_loss += float(nn.functional.cross_entropy(flat, y, reduction="sum"))
            correct += int((flat.argmax(-1) == y).sum())
            count += int(y.numel())
    finally:
        model.train(was_training)
    loss = total_loss / max(1, count)
    out = {"loss": loss, "acc": correct / max(1, count), "n": count}
    if data.task == "lm":
        out["ppl"] = math.exp(min(loss, 50.0))
    return out
