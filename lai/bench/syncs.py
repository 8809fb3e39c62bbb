"""What a piece of code asks of the device, counted on any device (a CPU run included).

:class:`DeviceWork` counts

- ``ops``: aten operations dispatched that may launch a kernel (views and allocations are
  not counted): on a GPU the quantity that bounds a launch-bound step, e.g. ResNet-18 on
  32x32 images;
- ``syncs``: the operations after which the host waits for a CUDA device: reading a scalar
  (``.item()``, ``float()``, ``int()``, ``bool()``), ``nonzero`` and boolean-mask indexing
  (their output shape depends on the data), ``unique``, ``masked_select``, and copies to the
  host (``.cpu()``, ``.numpy()``, ``.tolist()``).

On a CPU nothing actually waits, but the same calls are made, so a CPU test can check that a
training step would not stall a GPU. (On a CPU run it cannot tell host data from device
data: a scalar read from a host tensor, e.g. the longest row of a token batch during
gathering, is counted too.)
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops (overload packets) whose CUDA implementation waits for the device
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique",
             "_unique2", "unique_consecutive", "unique_dim", "equal", "allclose"}
_MASK_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
_METADATA_OPS = {"detach", "alias", "lift_fresh", "_unsafe_view", "set_", "empty_like",
                 "empty", "new_empty", "empty_strided", "new_empty_strided",
                 # shape/storage checks of forward-mode AD, lazy zeros: no kernel
                 "is_same_size", "_has_same_storage_numel", "_efficientzerotensor"}


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else None
    return isinstance(indices, (list, tuple)) and any(
        torch.is_tensor(i) and i.dtype == torch.bool for i in indices)


class DeviceWork(TorchDispatchMode):
    """Context manager counting aten ops and would-be host syncs (see module docstring).

    ``syncs`` is a :class:`collections.Counter` by operation name; ``n_syncs`` its total;
    with ``trace=True``, ``trace`` counts the (kernel) ops by name.
    """

    def __init__(self, trace: bool = False) -> None:
        super().__init__()
        self.ops = 0
        self.trace: Counter | None = Counter() if trace else None  # ops by name
        self.syncs: Counter = Counter()
        self._patched: list[tuple[str, Any]] = []

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _METADATA_OPS):  # views launch no kernel
            self.ops += 1
            if self.trace is not None:
                self.trace[name] += 1
        if name in _SYNC_OPS or (name in _MASK_INDEX_OPS and _has_bool_index(args)):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))

    def _patch(self, method: str) -> None:
        orig = getattr(torch.Tensor, method)
        counter = self.syncs

        def counted(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            counter[method] += 1
            return orig(t, *a, **k)

        self._patched.append((method, orig))
        setattr(torch.Tensor, method, counted)

    def __enter__(self) -> "DeviceWork":
        # device-to-host copies: on a CPU tensor .cpu() dispatches nothing, so count the calls
        for method in ("cpu", "numpy", "tolist"):
            self._patch(method)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for method, orig in reversed(self._patched):
                setattr(torch.Tensor, method, orig)
            self._patched.clear()
