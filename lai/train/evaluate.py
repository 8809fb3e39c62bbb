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
    # running sums stay on the device (float64 for the loss): read once, after the last batch
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    try:
        for start in range(0, len(split), batch_size):
            rows = torch.arange(start, min(len(split), start + batch_size))
            batch = split.gather(rows).to(device, non_blocking=True)
            inputs = data.preprocess(batch.inputs, False)
            with forward_context():
                logits = forward_logits(model, to_channels_last(inputs) if channels_last
                                        else inputs)
            logits = logits.float()
            flat = logits.reshape(-1, logits.shape[-1])
            y = batch.labels.reshape(-1)
            valid = y != IGNORE_INDEX  # LM: padding and the last position
            loss = nn.functional.cross_entropy(flat, y, ignore_index=IGNORE_INDEX,
                                               reduction="sum")
            correct = ((flat.argmax(-1) == y) & valid).sum()
            sums += torch.stack([loss.double(), correct.double(), valid.sum().double()])
    finally:
        model.train(was_training)
    total_loss, correct, count = sums.tolist()
    correct, count = int(correct), int(count)
    loss = total_loss / max(1, count)
    out = {"loss": loss, "acc": correct / max(1, count), "n": count}
    if data.task == "lm":
        out["ppl"] = math.exp(min(loss, 50.0))
    return out
