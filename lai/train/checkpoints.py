"""Reading a run's checkpoint: a bad one is moved aside, never a reason to stop."""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional

import torch

# what Trainer.state_dict() always holds (a file without them is not a checkpoint of ours)
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "loop", "metrics_bytes")


def load_checkpoint(path: Path) -> Optional[dict]:
    """The checkpoint at ``path`` (loaded on the CPU, weights only), or None when there is
    none. A file that does not load (truncated, foreign) or lacks the keys every checkpoint
    has is renamed ``checkpoint.bad-<time>.pt``, with the run's ``metrics.jsonl`` beside it
    (``metrics.bad-<time>.jsonl``, the records it would have resumed), and a one-line
    warning says so: the run then starts clean instead of failing on every rerun."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        # CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest
        state = torch.load(path, map_location="cpu", weights_only=True)
        problem = None if isinstance(state, dict) and all(k in state for k in REQUIRED_KEYS) \
            else "it holds no training state"
    except Exception as e:  # noqa: BLE001 - any unreadable file is moved aside the same way
        state, problem = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if problem is None:
        return state
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bad = path.with_name(f"{path.stem}.bad-{stamp}{path.suffix}")
    path.rename(bad)
    metrics = path.with_name("metrics.jsonl")
    if metrics.is_file():
        metrics.rename(path.with_name(f"metrics.bad-{stamp}.jsonl"))
    warnings.warn(f"unusable checkpoint {path} ({problem}): moved to {bad.name}; the run "
                  "starts from scratch", RuntimeWarning, stacklevel=2)
    return None
