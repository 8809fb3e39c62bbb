"""Stopping a run cleanly on Ctrl-C or SIGTERM (what SLURM sends at preemption).

:class:`StopSignals` replaces the SIGINT/SIGTERM handlers while the training loop runs:
the first signal only sets :attr:`StopSignals.received`, which the loop reads between two
steps to save a checkpoint and raise :class:`lai.errors.RunInterrupted`. A second signal
ends the process at once (the default handlers are back). Only in the main thread (Python
delivers signals there) and not in data-parallel runs, where ranks would stop at different
steps.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager; ``received`` is the name of the first signal caught (or None)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: Optional[str] = None
        self._old: dict = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signal.Signals(signum).name
        self._restore()  # a second signal acts at once

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __enter__(self) -> "StopSignals":
        if self.enabled:
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
