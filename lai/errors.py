"""Errors that end a run before training with a one-line message (``run.py`` prints them)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that composes but makes no sense (one-line message)."""


class MissingResourceError(FileNotFoundError):
    """Data files or model weights are absent and cannot be downloaded.

    The message names what was looked for and where to put it.
    """


class MissingDataError(MissingResourceError):
    """A dataset's files are absent (see :class:`MissingResourceError`)."""


class MissingModelError(MissingResourceError):
    """Pretrained weights or a tokenizer cannot be loaded (no network, no local copy)."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the run stops with its state saved."""


class RunInterrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM (e.g. SLURM's preemption) stopped a run between two steps;
    its state was saved to ``checkpoint`` (None: nothing to resume from). Running the same
    command again resumes it."""

    def __init__(self, signal_name: str, checkpoint: str | None, run_dir: str | None = None):
        self.signal_name, self.checkpoint, self.run_dir = signal_name, checkpoint, run_dir
        where = (f"state saved to {checkpoint}; run the same command to resume"
                 if checkpoint else "no checkpoint (nothing to resume from)")
        super().__init__(f"interrupted by {signal_name}: {where}")


def describe_os_error(e: OSError) -> str:
    """One line for a file-system failure (a read-only or full results folder, an
    unreadable data folder): what failed, on which path."""
    what = e.strerror or type(e).__name__
    path = e.filename if e.filename is not None else ""
    return f"{what}: {path}" if path else f"{what} ({e})"
