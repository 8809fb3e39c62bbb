"""A forward-mode pass inside a training forward without the tangents' reverse graph, and
without tangents that nothing can read any more.

Ghost's forward form (:mod:`lai.estimators.online.ghost`) makes every parameter a dual number and
runs the training forward once: the primal outputs keep their reverse-mode graph for the
training backward, and the tangents carry ``<g_V, grad ell_j>``. Two things then hold memory
that a plain forward does not:

1. **The tangents' reverse graph.** A tangent computed from primals that require grad
   (``x_dot W^T + x W_dot^T`` needs ``W``) requires grad itself, so autograd records every
   tangent operation and keeps its saved inputs, as if the tangents were to be
   differentiated again; nothing ever does. The tangent of every module's output is
   detached in place: the graph recorded inside the module is freed, the output is the same
   tensor (so in-place operations on it stay plain).
2. **The tangents of saved activations.** Autograd keeps every tensor it saves for the
   backward, and with it that tensor's forward gradient, until the dual level closes
   (``SavedVariable`` stores the tensor, or its data plus ``fw_grad``): about one tangent per
   saved activation, after the forward has long stopped reading them. With ``release=True``
   every dual tensor that enters or leaves a module is tracked, and at each module boundary
   a tracked tensor that no Python code references any more (only this tracker: its
   reference count, less the one the tensor's C++ owners add, see below) has its tangent
   released: the tangent tensor is re-pointed, in place, at a one-element storage holding
   NaN, broadcast to its shape (stride 0). Every holder of that tangent (the dual tensor,
   autograd's ``SavedVariable``) then holds 1 element instead of the activation's size.

Why the release is safe: forward-mode AD reads a tangent only when an operation takes its
dual tensor as input, and Python code can pass a tensor to an operation only if it can reach
it; a tensor with no Python reference left is reachable only from C++ (autograd's saved
tensors, which the backward unpacks after the dual level has closed, and the bases of
views, whose own tangents were made as views of the base's when the views were). The
tracker counts Python references as ``sys.getrefcount`` less one when the tensor's C++
use count is above one (PyTorch then keeps its Python object alive with a reference of
its own). If a released tangent were read anyway (a model that fetches a tensor back
from autograd's graph during its forward), it would read NaN, so the values would not be
finite, and a new view of it fails inside forward AD:
:class:`~lai.estimators.online.ghost.GhostEstimator` checks the values at its first capture and
names its ``release_tangents`` switch in both errors.

Measured with :class:`lai.bench.memory.PeakTensorMemory` on torchvision's ResNet-18 in train
mode, batch 128 at 32x32, fp32, the forward's peak above its start: 203 MiB with neither,
105 with (1), 80 with both (vanilla: 54; the peak is now the first BatchNorm's tangent
formula, and the step's peak is the backward's, as in vanilla). Values and training
gradients are bit-identical in all three (tested).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn


def _tensors(x: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in ``x`` (a tensor, or tuples, lists and mappings of them), into ``out``."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (tuple, list)):
        for v in x:
            _tensors(v, out)
    elif isinstance(x, Mapping):
        for v in x.values():
            _tensors(v, out)
    return out


def _drop_tangent_graph(x: Any) -> None:
    """Detach, in place, the tangent of each dual tensor in ``x`` (a tensor, or a tuple, list
    or mapping of them, e.g. a Hugging Face ``ModelOutput``) whose tangent has a reverse
    graph: the dual keeps the same tangent values and its primal keeps its graph. A tangent
    that is a view cannot be detached in place and is left: the next module's output cuts
    its graph."""
    for t in _tensors(x, []):
        tangent = fwAD.unpack_dual(t).tangent
        if tangent is not None and tangent.requires_grad and not tangent._is_view():
            tangent.detach_()


def _python_refs_of_list_item() -> int:
    """``sys.getrefcount(items[i])`` of a tensor held only by the list ``items``: the
    baseline the release test compares against (it differs between Python versions)."""
    items = [torch.empty(0)]
    return sys.getrefcount(items[0])


class TangentRelease:
    """Tracks dual tensors and releases the tangents of those no Python code can reach (see
    the module docstring). ``released``: how many tangents were released so far."""

    def __init__(self) -> None:
        self._tracked: list[torch.Tensor] = []
        self._ids: set[int] = set()
        self._poison: dict[tuple[torch.dtype, torch.device], torch.UntypedStorage] = {}
        self._alone = _python_refs_of_list_item()
        self.released = 0

    def track(self, x: Any) -> None:
        """Start tracking the tensors in ``x`` that require grad (the release skips those without
        a tangent)."""
        for t in _tensors(x, []):
            # a dual tensor in a training forward requires grad (its primal feeds the
            # backward); reading its tangent here would cost an operation per tensor
            if t.requires_grad and id(t) not in self._ids:
                self._ids.add(id(t))
                self._tracked.append(t)

    def sweep(self) -> None:
        """Release the tangent of every tracked tensor only this tracker references, and stop
        tracking it."""
        tracked = self._tracked
        alone = self._alone
        keep = []
        for i in range(len(tracked)):
            # a C++ owner (autograd's saved tensors, a view's base) adds one reference
            if sys.getrefcount(tracked[i]) - (tracked[i]._use_count() > 1) <= alone:
                self._release(tracked[i])
            else:
                keep.append(tracked[i])
        if len(keep) != len(tracked):
            self._tracked = keep
            self._ids = {id(t) for t in keep}

    def _release(self, t: torch.Tensor) -> None:
        tangent = fwAD.unpack_dual(t).tangent
        # a view's tangent shares its base's storage (nothing to free); efficient zeros hold
        # no memory
        if (tangent is None or tangent._is_view() or tangent._is_zerotensor()
                or tangent.numel() <= 1):
            return
        if tangent.requires_grad:  # not a module's output (those are detached on return)
            tangent.detach_()
        key = (tangent.dtype, tangent.device)
        poison = self._poison.get(key)
        if poison is None:
            poison = torch.full((1,), float("nan"), dtype=tangent.dtype,
                                device=tangent.device).untyped_storage()
            self._poison[key] = poison
        with torch.no_grad():
            tangent.set_(poison, 0, tangent.shape, (0,) * tangent.dim())
        self.released += 1

    def clear(self) -> None:
        self._tracked = []
        self._ids = set()


@contextmanager
def tangent_free_graph(model: nn.Module, release: bool = True) -> Iterator[TangentRelease | None]:
    """Inside an active ``fwAD.dual_level``, around a forward of ``model`` with grad enabled:
    the tangents' reverse graph is freed at every module's output and, with ``release``, the
    tangents of tensors no Python code references any more are released as each module of
    ``model`` returns (see the module docstring). Yields the :class:`TangentRelease`
    (``None`` without ``release``). The hook is removed on exit.

    One global module hook, filtered to ``model``'s modules, instead of one hook per module:
    registering a hook on every module at every step cost more than the hook's own work."""
    tracker = TangentRelease() if release else None
    ours = {id(m) for m in model.modules()}

    def after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if id(module) not in ours:
            return
        # bookkeeping on plain tensors: past any torch-function mode of the pass (Ghost's
        # ForwardFastPaths would add a Python call per tensor attribute read here)
        with torch._C.DisableTorchFunction():
            _drop_tangent_graph(output)
            if tracker is not None:
                # the inputs are still referenced by the caller here: tracked now, released
                # at a later module's return once the caller has dropped them
                tracker.track(args)
                tracker.track(kwargs)
                tracker.track(output)
                tracker.sweep()

    handle = nn.modules.module.register_module_forward_hook(after, with_kwargs=True)
    try:
        yield tracker
    finally:
        handle.remove()
        if tracker is not None:
            tracker.clear()
