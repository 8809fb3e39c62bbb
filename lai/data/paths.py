"""Where dataset files live: config ``data_dir``, else ``$LAI_DATA``, else ``~/.cache/lai``."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LAI_DATA"
DEFAULT_DIR = "~/.cache/lai"


def resolve_data_dir(value: str | os.PathLike | None) -> Path:
    """The data folder as an absolute path (it need not exist).

    Order: ``value`` (the config's ``data_dir``) when set and non-empty, else the ``LAI_DATA``
    environment variable, else ``~/.cache/lai``; ``~`` is expanded and the path resolved.
    """
    chosen = value if value not in (None, "") else (os.environ.get(ENV_VAR) or DEFAULT_DIR)
    return Path(chosen).expanduser().resolve()
