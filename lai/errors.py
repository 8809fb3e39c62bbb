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
