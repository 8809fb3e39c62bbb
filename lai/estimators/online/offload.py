"""A validation cache kept in host memory and copied to the device just before each use.

LAI's validation cache (``M_l`` or ``phi_v``, one entry per paired layer) is read once per
scoring step, layer by layer in the order of the forward. On a transformer it is the whole of
LAI's memory excess over plain training (about 630 MiB for bert-base at K = 20, T = 128). With
``offload``, :class:`HostCache` keeps every entry in pinned host memory and copies it to the
device on a side stream ``lookahead`` entries ahead of the layer that reads it, so that at most
``lookahead + 1`` entries are on the device at a time; the copies overlap the step's own work.
The values are the same: the device sees bit-identical copies of the entries.

The order of reads is learnt from the first step after each refresh (no prefetch there: each
entry is copied when asked for); later steps prefetch along it. A read that departs from the
learnt order is still served, by an on-demand copy.
"""
from __future__ import annotations

import torch


class HostCache:
    """Serves device copies of host-resident cache entries, prefetching in the order of use.

    Args:
        device: where the entries are used. On a CUDA device the host entries are pinned and
            copied on a side stream; on any other device :meth:`fetch` returns a copy made on
            the spot (the same bookkeeping, for tests).
        lookahead: entries copied ahead of the one being read.
    """

    def __init__(self, device: torch.device, lookahead: int = 2) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.device = torch.device(device)
        self.lookahead = int(lookahead)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._order: list[torch.Tensor] = []   # host entries in the order the step read them
        self._learning = True
        self._pos = 0                          # reads so far in the current step
        self._inflight: dict[int, tuple[torch.Tensor, object]] = {}  # id(host) -> (copy, event)
        self._buffers: dict[object, torch.Tensor] = {}  # slot -> host tensor, kept across refreshes
        self.copies = 0                        # host-to-device copies issued (for tests)
        self.peak_inflight = 0                 # most device copies held at once (for tests)

    def host(self, t: torch.Tensor, slot: object = None) -> torch.Tensor:
        """``t`` copied to host memory (pinned for a CUDA device). With a ``slot``, the host
        tensor of that slot is reused when shape and dtype match (a refresh rebuilds the same
        shapes, and allocating pinned memory costs far more than the copy)."""
        buf = self._buffers.get(slot) if slot is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.cuda)
            if slot is not None:
                self._buffers[slot] = buf
        return buf.copy_(t.detach())

    def reset(self) -> None:
        """Forget the learnt order and drop the copies in flight (after a refresh)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._order, self._learning, self._pos, self._inflight = [], True, 0, {}

    def begin_step(self) -> None:
        """Start of a scoring step: the first entries of the learnt order are sent now."""
        if self._order:
            self._learning = False
        self._pos = 0
        for t in self._order[:self.lookahead]:
            self._issue(t)

    def fetch(self, host: torch.Tensor) -> torch.Tensor:
        """The device copy of ``host``, safe to use on the current stream."""
        if self._learning:
            self._order.append(host)
        self._pos += 1
        entry = self._inflight.pop(id(host), None)
        if entry is None:
            entry = self._copy(host)
        for t in self._order[self._pos:self._pos + self.lookahead]:
            self._issue(t)
        dev, event = entry
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            # the copy was allocated on the side stream: keep its memory from being reused
            # until the work queued here on it has run
            dev.record_stream(stream)
        return dev

    def _issue(self, host: torch.Tensor) -> None:
        if id(host) in self._inflight or len(self._inflight) > self.lookahead:
            return
        self._inflight[id(host)] = self._copy(host)
        self.peak_inflight = max(self.peak_inflight, len(self._inflight))

    def _copy(self, host: torch.Tensor) -> tuple[torch.Tensor, object]:
        self.copies += 1
        if not self.cuda:
            return host.to(self.device, copy=True), None
        with torch.cuda.stream(self._stream):
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return dev, event
