"""Forward hooks that hand each chosen layer's input to a callback, as per-sample rows.

LAI and LLI need, for every chosen layer ``l``, ``phi_l(x)``: the layer's input for sample
``x`` flattened, with token positions where ``attention_mask`` is 0 zeroed. The hooks pass
``phi`` to a callback *during* the forward so it can be folded into a small accumulator and
dropped at once: nothing per-layer is kept alive beyond what autograd keeps anyway.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from lai.batching import Batch, logits_of

LayerKey = tuple  # (module name, call index within one forward)
# LAI's layers: every linear map of its input whose input it pairs (Eq. 4); Hugging Face's
# Conv1D (GPT-2's blocks: x @ W + b over the last axis) counts too, see is_linear_layer
DEFAULT_LAYER_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``): a linear layer on the last
    axis with its weight stored ``[in, out]``. Recognised without importing transformers (a
    model that holds one has imported it)."""
    cls = type(module)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in cls.__mro__)


def is_linear_layer(module: nn.Module) -> bool:
    """A layer applied to the last axis of its input (``nn.Linear``, Hugging Face's
    ``Conv1D``): its ``[B, T, D]`` input is a sequence of per-token rows."""
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def fp32_math(x: torch.Tensor) -> AbstractContextManager:
    """Autocast switched off for ``x``'s device type if it is on (else a no-op context): the
    estimators' arithmetic inside a forward hook must not be cast down to bf16 (the layer
    inputs themselves are what the autocast forward made them)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return nullcontext()


def output_layer_name(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` in ``model.named_modules()`` order."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise ValueError("the model has no nn.Linear layer; pass output_layer=<module name>")
    return name


def select_layers(model: nn.Module, layers: str | Sequence[str], output_layer: str | None = None,
                  layer_types: tuple[type, ...] = DEFAULT_LAYER_TYPES) -> list[str]:
    """Names of the modules whose inputs LAI pairs, in registration order.

    ``layers``: ``"all"`` = every module of ``layer_types`` (by default ``nn.Linear``,
    ``nn.Conv1d/2d/3d`` and their subclasses, and Hugging Face's ``Conv1D``: every layer that
    is a linear map of its input; the paper's Eq. 4), ``"lli"`` = the output layer only, ``"code"`` = the
    first such layer (its input is the raw model input for MLPs/CNNs, the embedding output for
    transformers) plus the output layer, which is what the paper's public code computes;
    or an explicit list of module names.
    """
    modules = dict(model.named_modules())
    out = output_layer or output_layer_name(model)
    if out not in modules:
        raise ValueError(f"output_layer {out!r} is not a module of the model")
    if not isinstance(layers, str):
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[0]!r} in the model")
        return list(layers)
    typed = [n for n, m in modules.items() if isinstance(m, layer_types)
             or (layer_types is DEFAULT_LAYER_TYPES and is_hf_conv1d(m))]
    if layers == "all":
        return typed if out in typed else typed + [out]
    if layers == "lli":
        return [out]
    if layers == "code":
        first = typed[0] if typed else out
        return [first] if first == out else [first, out]
    raise ValueError(f"unknown layer set {layers!r}; use all | code | lli or a list of names")


def flatten_rows(x: torch.Tensor, mask: torch.Tensor | None, token_layer: bool,
                 nhwc: bool = False) -> torch.Tensor:
    """``x [B, ...]`` -> ``[B, prod(...)]`` in float32 (float64 kept), padding positions zeroed.

    ``mask [B, T]`` applies to token layers whose input is ``[B, T, ...]``. ``nhwc`` (4-D
    ``x`` only): the row is ``x[b]`` in (H, W, C) order instead of (C, H, W), which is a view
    of a channels-last tensor rather than a copy.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # keeps the memory format
    if nhwc:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    if token_layer and mask is not None and x.dim() >= 3 and x.shape[:2] == mask.shape:
        x = x * mask.view(*mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    return x.reshape(x.shape[0], -1)


def is_nhwc(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels-last (and not NCHW-contiguous as well)."""
    return (x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last))


def _version_of(x: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change); None where untracked
    (inference-mode tensors)."""
    try:
        return x._version
    except RuntimeError:
        return None


class LayerTap:
    """Context manager: while active, every call of a named module calls
    ``on_input(key, phi, shape, token)`` with ``phi [B, D]`` (flattened, masked), the
    unflattened per-sample input shape, and ``token`` = the layer is linear on the last axis
    (:func:`is_linear_layer`) and applied to a ``[B, T, ...]`` sequence; the model's logits are kept in ``self.logits``.

    ``key = (module name, call index)`` separates repeated calls of a shared module.

    A layer fed the very same tensor as the previously tapped layer (same object, unchanged
    since: e.g. the query, key and value projections of an attention block) gets the same
    ``phi`` object, flattened once; a callback may test ``phi is previous_phi`` to share work.

    With ``native_layout=True`` the callback takes a fifth argument ``nhwc``: a non-token
    layer's channels-last 4-D input (a convolution's, under ``channels_last``) is then
    flattened in (H, W, C) order, a view instead of a copy, and ``nhwc`` says so.

    ``batch_size``: the batch's B. A linear layer whose input has ``B * T`` rows (``T`` the
    attention mask's length: OPT's ``fc1``/``fc2`` take the hidden states flattened to
    ``[B * T, D]``) is handed them as the ``[B, T, D]`` they were, batch-major, i.e. as a token
    layer; any other input whose leading size is not ``B`` (tokens routed to experts, packed
    sequences, a sequence-first layout) is a ValueError naming the layer, since its rows
    cannot be attributed to samples.

    With ``output_layer``, that module's output ``s^(L)`` is kept in ``self.output`` so that
    ``d ell / d s^(L)`` can be taken by autograd. Under ``no_grad`` the output is replaced by a
    detached leaf and grad mode is switched on for the (short) rest of the forward, so the
    graph from ``s^(L)`` to the logits exists; the mode is restored when the forward returns.
    """

    def __init__(self, model: nn.Module, names: Sequence[str],
                 on_input: Callable[..., None],
                 attention_mask: torch.Tensor | None = None, output_layer: str | None = None,
                 native_layout: bool = False, batch_size: int | None = None):
        self.model = model
        self.batch_size = batch_size
        self.names = list(names)
        self.on_input = on_input
        self.native_layout = native_layout
        self.mask = attention_mask
        self.output_layer = output_layer
        self.logits: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._grad_mode: bool | None = None
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self._last: tuple | None = None  # (input, its version, token_layer, phi)
        self._masks: dict[torch.dtype, torch.Tensor] = {}  # the mask in each float dtype

    def _keep_output(self, mod: nn.Module, args: tuple, output: torch.Tensor):
        if torch.is_grad_enabled():
            self.output = output
            return None
        if self._grad_mode is None:
            self._grad_mode = False
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        self.output = leaf
        return leaf

    def _hook(self, name: str, module: nn.Module):
        token_layer = is_linear_layer(module)

        def hook(mod: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if self.batch_size is not None and (x.dim() == 0 or x.shape[0] != self.batch_size):
                x = self._per_sample_view(name, x, token_layer)
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            version = _version_of(x)
            last = self._last
            nhwc = self.native_layout and not token_layer and is_nhwc(x)
            with torch.no_grad(), fp32_math(x):
                if (last is not None and last[0] is x and version is not None
                        and last[1] == version and last[2] == (token_layer, nhwc)):
                    phi = last[3]  # the same input as the previous tapped layer: same rows
                else:
                    phi = flatten_rows(x.detach(), self._mask_like(x), token_layer, nhwc)
                    # x is held until the next tapped layer, so `is` cannot match a new
                    # tensor that reuses its memory
                    self._last = (x, version, (token_layer, nhwc), phi)
                args = ((name, k), phi, x.shape[1:], token_layer and x.dim() >= 3)
                self.on_input(*args, nhwc) if self.native_layout else self.on_input(*args)

        return hook

    def _per_sample_view(self, name: str, x: torch.Tensor, token_layer: bool) -> torch.Tensor:
        """``x [B * T, ...]`` of a linear layer as ``[B, T, ...]`` (see the class docstring);
        ValueError for any other leading size."""
        b = self.batch_size
        t = self.mask.shape[1] if self.mask is not None and self.mask.dim() == 2 else None
        if token_layer and t is not None and x.dim() >= 2 and x.shape[0] == b * t:
            return x.view(b, t, *x.shape[1:])
        rows = x.shape[0] if x.dim() else 0
        raise ValueError(
            f"layer {name!r} received an input with {rows} rows for a batch of {b}"
            + (f" (and sequences of {t})" if t is not None else "")
            + ": its rows cannot be attributed to samples (tokens routed to experts, packed "
            "sequences, a sequence-first layout?); leave it out with estimator.layers "
            "(a list of module names), or use ghost")

    def _mask_like(self, x: torch.Tensor) -> torch.Tensor | None:
        """The attention mask in the dtype ``flatten_rows`` multiplies ``x`` with, converted
        once per forward rather than once per layer."""
        if self.mask is None:
            return None
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        m = self._masks.get(dtype)
        if m is None:
            m = self._masks[dtype] = self.mask.to(dtype)
        return m

    def _keep_logits(self, mod: nn.Module, args: tuple, output) -> None:
        self.logits = logits_of(output)
        self._last = None
        self._restore_grad_mode()

    def _restore_grad_mode(self) -> None:
        if self._grad_mode is not None:
            torch.set_grad_enabled(self._grad_mode)
            self._grad_mode = None

    def __enter__(self) -> "LayerTap":
        # get_submodule walks each dotted name: cheaper, per forward, than listing them all
        for n in self.names:
            module = self.model.get_submodule(n)
            self._handles.append(module.register_forward_pre_hook(
                self._hook(n, module), with_kwargs=True))
        if self.output_layer is not None:
            self._handles.append(self.model.get_submodule(self.output_layer)
                                 .register_forward_hook(self._keep_output))
        self._handles.append(self.model.register_forward_hook(self._keep_logits))
        return self

    def __exit__(self, *exc) -> None:
        self._last = None
        self._masks.clear()
        # the callback usually closes over the capture that holds this tap (capture -> tap
        # -> callback -> capture): dropped, the cycle is broken and a step's accumulators are
        # freed when the capture goes, not at the garbage collector's next pass (one step's
        # [B, T, K] buffers of an LM lingered into the next step's peak)
        self.on_input = None
        self._restore_grad_mode()  # if the forward raised before the model hook ran
        for h in self._handles:
            h.remove()
        self._handles.clear()


def chunks(batch: Batch, size: int) -> Iterator[Batch]:
    """``batch`` in consecutive sub-batches of at most ``size`` rows (itself, uncopied, when
    it fits in one)."""
    n = len(batch)
    if n <= size:
        yield batch
        return
    for start in range(0, n, size):
        yield batch.select(torch.arange(start, min(n, start + size)))


def _frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers running torch's own forward and tracking running statistics."""
    base = nn.modules.batchnorm._BatchNorm
    return [m for m in model.modules()
            if isinstance(m, base) and type(m).forward is base.forward
            and m.track_running_stats and m.running_mean is not None]


class BufferSnapshot:
    """Copies of a model's buffers that :func:`preserved_buffers` reuses from one scoring
    forward to the next while the buffer is unchanged (same tensor, same version counter:
    PyTorch bumps it at every in-place change, under ``no_grad`` too). A model whose forward
    changes no buffer (attention-mask buffers, position ids) then costs no copy at all
    per scoring forward; a changed buffer is restored from its copy, as without a snapshot.
    Holds one copy of every such buffer for as long as the snapshot lives.

    ``host=True``: the copies of accelerator buffers live in (pinned) host memory, so the
    snapshot costs no device memory (GPT-Neo-125M's twelve 2048 x 2048 causal masks are
    48 MiB); a copy is taken, and copied back, only when its buffer changed, so the transfers
    are rare. On the CPU the copies are host memory either way."""

    def __init__(self, host: bool = False) -> None:
        self.host = bool(host)
        self._entries: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _copy(self, b: torch.Tensor) -> torch.Tensor:
        if not self.host or b.device.type == "cpu":
            return b.detach().clone()
        # the device-to-host copy is queued on the current stream before the forward that
        # might write the buffer, so no wait is needed here
        out = torch.empty(b.shape, dtype=b.dtype, device="cpu",
                          pin_memory=torch.cuda.is_available())
        return out.copy_(b.detach(), non_blocking=True)

    def copies(self, buffers: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor,
                                                                int | None]]:
        """``(buffer, copy, version)`` per buffer, copying only where no valid copy is held."""
        out, entries = [], {}
        for b in buffers:
            version = _version_of(b)
            entry = self._entries.get(id(b))
            if entry is None or entry[0] is not b or version is None or entry[2] != version:
                entry = (b, self._copy(b), version)
            if version is not None:
                entries[id(b)] = entry
            out.append(entry)
        self._entries = entries  # buffers no longer in the model are let go
        return out

    def restored(self, b: torch.Tensor, copy: torch.Tensor) -> None:
        """``b`` was just copied back from ``copy``: the copy is valid for its new version."""
        version = _version_of(b)
        if version is not None:
            self._entries[id(b)] = (b, copy, version)


@contextmanager
def preserved_buffers(model: nn.Module, snapshot: BufferSnapshot | None = None
                      ) -> Iterator[None]:
    """Leave every buffer (e.g. BatchNorm running statistics) as it was on exit, so a forward
    in train mode used only for scoring leaves the model exactly as it was.

    BatchNorm layers are not copied: their statistics update is switched off instead
    (``track_running_stats=False`` for the duration). In train mode torch's BatchNorm then
    normalises with the batch statistics as before (bit for bit on CPU, tested) but neither
    reads nor writes the buffers; in eval mode it reads the running statistics either way.
    This saves two copies of every BN buffer per scoring forward (about 120 small kernels
    for ResNet-18). Every other buffer is copied and restored; with a ``snapshot`` (see
    :class:`BufferSnapshot`) the copy is taken only when the buffer changed since the last
    one. Only buffers that the forward changed are copied back.
    """
    frozen = _frozen_batchnorms(model)
    skip = {id(b) for m in frozen
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None}
    buffers = [b for b in model.buffers() if id(b) not in skip]
    if snapshot is None:
        saved = [(b, b.detach().clone(), _version_of(b)) for b in buffers]
    else:
        saved = snapshot.copies(buffers)
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True
        # only what changed: a buffer whose version counter did not move was not written
        # (in-place writes through autograd-visible tensors all bump it; inference-mode
        # buffers have none and are always copied back)
        saved = [e for e in saved if e[2] is None or _version_of(e[0]) != e[2]]
        if saved:
            with torch.no_grad():
                same = [(b, c) for b, c, _ in saved if b.device == c.device]
                if same:
                    torch._foreach_copy_([b for b, _ in same], [c for _, c in same])
                for b, c, _ in saved:  # a host snapshot's copies (rare: changed buffers)
                    if b.device != c.device:
                        b.copy_(c, non_blocking=True)
            if snapshot is not None:
                for b, c, _ in saved:
                    snapshot.restored(b, c)
