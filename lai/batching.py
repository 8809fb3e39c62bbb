"""One batch format for the whole library, and the one way to call a model on it.

A *batch* is what `value()`, the estimators and the trainer take. Three forms are accepted:

- ``(inputs, targets)``: a tuple/list; ``inputs`` is a tensor (or a dict of keyword tensors),
  the model is called as ``model(inputs)`` (or ``model(**inputs)``);
- a dict of model keyword arguments with a ``labels`` key (Hugging Face style); an ``idx``
  key, if present, holds dataset indices and is never passed to the model;
- the internal form produced by the data collators: ``{"idx", "inputs", "labels"}``.

`as_batch` turns any of them into a :class:`Batch`. Model outputs may be tensors, or objects
or dicts with ``logits``.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A batch split into the model's inputs, the targets and (optionally) dataset indices.

    ``inputs``: a tensor ``[B, ...]`` or a dict of tensors with a leading batch dimension.
    ``labels``: ``[B]`` class ids, or ``[B, T]`` token ids for language modelling
    (``-100`` = ignored position). ``idx``: ``[B]`` dataset indices or ``None``.
    """

    inputs: Any
    labels: torch.Tensor
    idx: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """``[B, T]`` mask (1 = real token) when the inputs carry one, else ``None``."""
        if isinstance(self.inputs, Mapping):
            return self.inputs.get("attention_mask")
        return None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(x: Any) -> Any:
            if torch.is_tensor(x):
                return x.to(device, non_blocking=non_blocking)
            if isinstance(x, Mapping):
                return {k: move(v) for k, v in x.items()}
            return x

        return Batch(move(self.inputs), move(self.labels), move(self.idx))

    def pin_memory(self) -> "Batch":
        """The same batch in page-locked host memory, so that ``to(cuda, non_blocking=True)``
        is truly asynchronous (a copy from pageable memory may wait for the device)."""
        def pin(x: Any) -> Any:
            if torch.is_tensor(x):
                return x.pin_memory() if x.device.type == "cpu" else x
            if isinstance(x, Mapping):
                return {k: pin(v) for k, v in x.items()}
            return x

        return Batch(pin(self.inputs), pin(self.labels), pin(self.idx))

    def select(self, rows: torch.Tensor) -> "Batch":
        """The sub-batch of the given rows (a bool mask ``[B]`` or index tensor)."""
        return Batch(_take(self.inputs, rows), _take(self.labels, rows),
                     _take(self.idx, rows))


def _take(x: Any, rows: torch.Tensor) -> Any:
    """``x``'s given rows, recursing into dicts. A module-level function rather than a nested
    one that calls itself: such a closure is a reference cycle, which kept ``rows`` alive
    until the garbage collector's next pass."""
    if torch.is_tensor(x):
        return x[rows.to(x.device)]
    if isinstance(x, Mapping):
        return {k: _take(v, rows) for k, v in x.items()}
    return x


def as_batch(batch: Any) -> Batch:
    """Normalise any accepted batch form (see module docstring) to a :class:`Batch`."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(
                "a dict batch needs a 'labels' key (Hugging Face style); got keys "
                f"{sorted(batch)}"
            )
        if "inputs" in batch and set(batch) <= {"inputs", "labels", "idx"}:
            return Batch(batch["inputs"], batch["labels"], batch.get("idx"))
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "idx")}
        return Batch(inputs, batch["labels"], batch.get("idx"))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return Batch(batch[0], batch[1], None)
    raise TypeError(
        "a batch must be an (inputs, targets) tuple or a dict of model keyword arguments "
        f"with a 'labels' key; got {type(batch).__name__}"
    )


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output (tensor, ``.logits`` attribute or ``['logits']``)."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def forward_logits(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on ``inputs`` (tensor -> positional, dict -> keywords); return logits.

    Returns ``[B, C]`` for classification or ``[B, T, V]`` for language modelling.
    """
    if isinstance(inputs, Mapping):
        return logits_of(model(**inputs))
    return logits_of(model(inputs))


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_CUSTOM_LOSS: ContextVar[Optional[LossFn]] = ContextVar("lai_per_sample_loss", default=None)


@contextmanager
def using_loss(loss_fn: Optional[LossFn]) -> Iterator[None]:
    """Within the block, :func:`per_sample_loss` is ``loss_fn(logits, labels) -> [B]`` (None:
    the default cross-entropy), for every estimator, the trainer and :class:`lai.Curator`.
    ``loss_fn`` must give each sample's loss from its own row of the logits (no mixing across
    the batch), differentiably; the estimators then take its output gradient by autograd
    (the default's closed form is used only for the default)."""
    token = _CUSTOM_LOSS.set(loss_fn)
    try:
        yield
    finally:
        _CUSTOM_LOSS.reset(token)


def custom_loss() -> Optional[LossFn]:
    """The per-sample loss set by :func:`using_loss`, or None (the default cross-entropy)."""
    return _CUSTOM_LOSS.get()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample loss ``[B]``: the one set by :func:`using_loss`, else cross-entropy (natural
    log).

    Classification: ``logits [B, C]``, ``labels [B]`` (or soft labels ``[B, C]``). Language
    modelling: ``logits [B, T, V]`` and ``labels [B, T]`` already aligned with the logits
    (position t predicts ``labels[:, t]``); the per-sample loss is the mean over positions
    whose label is not ``-100``.
    """
    fn = _CUSTOM_LOSS.get()
    if fn is not None:
        out = fn(logits, labels)
        if out.shape != (logits.shape[0],):
            raise ValueError(f"the per-sample loss must return [B] = [{logits.shape[0]}], got "
                             f"{tuple(out.shape)}")
        return out
    if logits.dim() == 2:
        return nn.functional.cross_entropy(logits, labels, reduction="none")
    flat = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return flat.sum(dim=1) / counts


LM_LABELS = ("auto", "hf", "aligned")


def is_hf_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal language model (``...ForCausalLM``, ``...LMHeadModel``): it
    takes ``labels`` equal to the input ids and shifts them inside its loss."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_hf_model(model: nn.Module) -> bool:
    """A Hugging Face ``transformers`` model (its config is a ``PretrainedConfig``)."""
    config = getattr(model, "config", None)
    return any(c.__name__.lower() == "pretrainedconfig" and c.__module__.startswith("transformers")
               for c in type(config).__mro__)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face causal-LM labels (the input ids; ``-100`` = ignored) aligned with the
    logits: position ``t`` predicts ``labels[:, t + 1]``, the last position nothing. The
    per-sample loss on the result is the model's own (shifted) loss of that sample."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def resolve_labels(model: nn.Module, raw: Any, batch: Batch, lm_labels: str = "auto") -> Batch:
    """``batch`` with token labels ``[B, T]`` aligned with the logits, as the estimators take
    them (a :class:`Batch` the caller built is taken as aligned already).

    ``lm_labels``: ``"hf"`` = Hugging Face's causal-LM convention (labels = the input ids,
    shifted inside); ``"aligned"`` = ``labels[:, t]`` is what ``logits[:, t]`` predicts;
    ``"auto"`` = ``hf`` for a Hugging Face causal LM, ``aligned`` for other Hugging Face
    models (token classification and masked LMs do not shift) and for a ``Batch``, and a
    ValueError saying what to pass for any other model given integer token labels.
    """
    if lm_labels not in LM_LABELS:
        raise ValueError(f"lm_labels={lm_labels!r} is not one of: {', '.join(LM_LABELS)}")
    labels = batch.labels
    if labels.dim() != 2 or labels.is_floating_point():
        return batch  # one label (or a soft-label row) per sample: nothing to align
    if lm_labels == "auto":
        if isinstance(raw, Batch) or (is_hf_model(model) and not is_hf_causal_lm(model)):
            return batch
        if not is_hf_causal_lm(model):
            raise ValueError(
                f"token labels [B, T] for a {type(model).__name__}, which is not a Hugging "
                "Face model: say how they line up with the logits, lm_labels='hf' (labels = "
                "the input ids, as Hugging Face causal LMs take them: shifted by one here) or "
                "lm_labels='aligned' (labels[:, t] is what logits[:, t] predicts)")
        lm_labels = "hf"
    if lm_labels == "aligned":
        return batch
    return Batch(batch.inputs, shift_labels(labels), batch.idx)
