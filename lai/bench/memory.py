"""Peak memory of live tensor storage during a region of code, on any device (a CPU included).

:class:`PeakTensorMemory` is a ``TorchDispatchMode`` that keeps a running total of the bytes of
the tensor storages that are alive, and its maximum over the region::

    with PeakTensorMemory(device="cpu") as mem:
        trainer_step()
    mem.peak_bytes, mem.start_bytes, mem.end_bytes   # ints, bytes

What is counted (each ``torch.UntypedStorage`` once, by identity: views, ``detach`` and
in-place results add nothing; ``storage.nbytes()`` bytes):

- **alive at the start** (``start_bytes``): with ``scan_gc=True`` (default) every tensor that
  has a Python object, found with ``gc.get_objects()`` (parameters, buffers, optimizer state,
  held batches, caches), plus the ``.grad`` of every such leaf tensor (a gradient often has no
  Python object of its own); and every tensor reachable from the ``roots`` passed in (tensors,
  modules: parameters, buffers and their ``.grad``; optimizers: state and parameters; dicts,
  lists and tuples of these). This is what ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` would already see as allocated. A storage that existed before the
  region but was not found there (held only by C++, e.g. a retained autograd graph) is added
  to ``start_bytes`` (and to the running total, and the peak) the first time an operation in
  the region reads it or writes it in place;
- **created in the region**: every storage returned by an aten operation that is not one of
  that operation's inputs' storages (out-of-place results, factories, ``lift_fresh``, i.e.
  ``torch.tensor``/``torch.from_numpy``), including autograd's saved tensors (they are created
  by the forward and stay alive until the backward releases them), gradients and optimizer
  state. Its bytes are added when it is created and subtracted when it is freed (a weakref
  finalizer on the storage: a storage's Python object lives exactly as long as the storage);
  a storage resized in place (``out=`` ops, ``resize_``) is re-counted when next seen.

``peak_bytes`` is the maximum of the running total, taken after each operation: it includes
``start_bytes``. ``end_bytes`` is the total at exit. With ``device`` set (``"cpu"``,
``"cuda"``, or a ``torch.device``), only storages on devices of that type are counted.

What is not counted: allocator rounding and caching (the CUDA caching allocator rounds blocks
up to 512 bytes and keeps freed blocks; ``max_memory_allocated`` includes the rounding, not
the cache), workspaces that kernels allocate internally without returning a tensor (cuDNN,
cuBLAS, oneDNN scratch: a CPU 3x3 convolution's forward and backward use scratch of about
three times its input), tensors created without passing through the dispatcher (C++ code
under ``no_dispatch``; a storage made that way in the region and read later is taken for one
alive at the start), meta and fake tensors, forward-mode AD's efficient zero tensors (they
hold no memory), and non-tensor memory (Python objects, the interpreter, libraries). A
storage shared by several tensors, or a tensor that is a view of a big base, counts the whole
storage. Allocations are seen when an operation returns, so the peak is a lower bound on what
an allocator without caching needs. Checked against the CPU allocator's own events
(``torch.profiler`` with ``profile_memory=True``) over one training step of the bench: equal
for the tiny BERT (vanilla, LAI, Ghost), about 9 MiB lower for ResNet-18 at batch 32 (the
convolutions' scratch; 14 vs 23 MiB above the start for vanilla).

This measures the same quantity as ``torch.distributed._tools.mem_tracker.MemTracker`` but
differs where it matters for a whole training step: ``MemTracker`` counts only storages it
sees as outputs of operations or that are registered with ``track_external`` (a cache made
before the region and only read in it is missed, and a pre-existing tensor updated in place
is counted as new from then on), and it installs global module and gradient hooks.
"""
from __future__ import annotations

import gc
import warnings
import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakTensorMemory"]

# ops whose output aliases an input that is a freshly made tensor (torch.tensor, from_numpy)
_FRESH_OPS = {"lift_fresh"}


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if t.is_meta or type(t).__name__ == "FakeTensor" or t._is_zerotensor():
        return None  # no memory (a ZeroTensor's storage reports its size but holds no data)
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, functorch wrappers
        return None


def _tensors(obj: Any, seen: set[int]) -> Iterable[torch.Tensor]:
    """Every tensor reachable from ``obj`` (see the module docstring), each once."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        try:
            grad = obj.grad if obj.is_leaf else None
        except (RuntimeError, NotImplementedError, TypeError):
            grad = None
        if grad is not None:
            yield grad
    elif isinstance(obj, torch.nn.Module):
        for t in obj.parameters():
            yield from _tensors(t, seen)
        for t in obj.buffers():
            yield from _tensors(t, seen)
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            yield from _tensors(group["params"], seen)
        for state in obj.state.values():
            yield from _tensors(state, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v, seen)


class PeakTensorMemory(TorchDispatchMode):
    """Context manager: peak bytes of live tensor storage in a region (see module docstring).

    Args:
        *roots: objects whose tensors are alive at the start (tensors, modules, optimizers,
            containers of these); added to what the ``gc`` scan finds.
        scan_gc: also count every tensor with a Python object at the start (default True).
            Call ``gc.collect()`` first if unreachable tensors should not be counted.
        device: count only storages on this device type (default: every device).

    Attributes (bytes, ints): ``start_bytes``, ``peak_bytes``, ``end_bytes``, ``current_bytes``
    (running total; frozen at exit). ``peak_mib``/``start_mib``: the same in MiB (2**20 bytes).
    """

    def __init__(self, *roots: Any, scan_gc: bool = True,
                 device: str | torch.device | None = None) -> None:
        super().__init__()
        self._roots = roots
        self._scan_gc = scan_gc
        self._device = None if device is None else torch.device(device).type
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (ref, nbytes)
        self._active = False
        self.start_bytes = self.current_bytes = self.peak_bytes = self.end_bytes = 0

    # -- bookkeeping ------------------------------------------------------------------------
    def _freed(self, key: int, ref: weakref.ref) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[0] is ref:
            del self._live[key]
            if self._active:
                self.current_bytes -= entry[1]

    def _add(self, st: torch.UntypedStorage, pre_existing: bool) -> None:
        """Start counting ``st`` (not yet counted); ``pre_existing``: alive since the start."""
        n = st.nbytes()
        key = id(st)
        ref = weakref.ref(st, lambda r, key=key: self._freed(key, r))
        self._live[key] = (ref, n)
        self.current_bytes += n
        if pre_existing:
            self.start_bytes += n
            self.peak_bytes += n  # it was alive at every point already passed
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _counted(self, t: torch.Tensor) -> torch.UntypedStorage | None:
        """The storage of ``t`` if it is one to count, re-counting it if it was resized."""
        if self._device is not None and t.device.type != self._device:
            return None
        st = _storage(t)
        if st is None:
            return None
        entry = self._live.get(id(st))
        if entry is not None and entry[0]() is st and entry[1] != st.nbytes():
            n = st.nbytes()
            self._live[id(st)] = (entry[0], n)
            self.current_bytes += n - entry[1]
        return st

    def _known(self, st: torch.UntypedStorage) -> bool:
        entry = self._live.get(id(st))
        return entry is not None and entry[0]() is st

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> "PeakTensorMemory":
        self._live.clear()
        self.start_bytes = self.current_bytes = self.peak_bytes = self.end_bytes = 0
        seen: set[int] = set()
        found = list(_tensors(list(self._roots), seen))
        if self._scan_gc:
            with warnings.catch_warnings():  # isinstance on deprecated module attributes
                warnings.simplefilter("ignore")
                objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
            found += _tensors(objs, seen)
            del objs
        for t in found:
            st = self._counted(t)
            if st is not None and not self._known(st):
                self._add(st, pre_existing=True)
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.end_bytes = self.current_bytes
        self._active = False
        self._live.clear()  # drops the weakrefs: their callbacks will not run
        return super().__exit__(*exc)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def start_mib(self) -> float:
        return self.start_bytes / 2**20

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fresh = func.overloadpacket.__name__ in _FRESH_OPS
        inputs = {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                st = self._counted(t)
                if st is not None:
                    inputs[id(st)] = st
                    if not fresh and not self._known(st):  # alive before, not found at entry
                        self._add(st, pre_existing=True)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = self._counted(t)
                if st is None or self._known(st):
                    continue
                self._add(st, pre_existing=id(st) in inputs and not fresh)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out
