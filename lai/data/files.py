"""Reading and writing the prepared local format, and the missing-data error message.

Prepared text splits are gzip JSON Lines (``<split>.jsonl.gz``, one object per line);
``labels.json`` lists class names in label-id order (see ``shared/data/README.md``).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterable, Sequence

from lai.data.base import MissingDataError
from lai.errors import MissingResourceError


class MalformedDataError(MissingResourceError):
    """A data file is present but cannot be read as its format (one-line message)."""


def read_jsonl_gz(path: Path, fields: Sequence[str] | None = None) -> dict[str, list]:
    """Columns of a ``.jsonl.gz`` file: ``{field: [value per row]}`` (all fields if ``None``).

    A file that is not gzip, a line that is not a JSON object, or a row without one of
    ``fields`` raises :class:`MalformedDataError` naming the file and the line."""
    rows, line_no = [], 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise ValueError("not a JSON object")
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno:
            raise  # the file system's error (missing, unreadable): reported as such
        where = f" line {line_no}" if line_no else ""
        raise MalformedDataError(f"{path}{where}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else 'unreadable'}; "
                                 "expected gzip JSON Lines (one object per line)") from None
    keys = list(fields) if fields is not None else (list(rows[0]) if rows else [])
    for i, r in enumerate(rows):
        missing = [k for k in keys if k not in r]
        if fields is not None and missing:
            raise MalformedDataError(f"{path}: row {i + 1} has no field(s) "
                                     f"{', '.join(missing)}")
    return {k: [r.get(k) for r in rows] for k in keys}


def write_jsonl_gz(path: Path, columns: dict[str, Sequence]) -> None:
    """Write columns (equal lengths) as a deterministic gzip JSON Lines file (mtime 0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(columns)
    n = len(columns[keys[0]]) if keys else 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for i in range(n):
            line = json.dumps({k: columns[k][i] for k in keys}, ensure_ascii=False)
            gz.write(line.encode("utf-8") + b"\n")
    tmp.replace(path)  # atomic: a crash never leaves a half-written split behind


def read_class_names(path: Path) -> list[str] | None:
    """Class names from a ``labels.json`` list, or ``None`` when the file is absent."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return [str(x) for x in json.load(f)]


def missing_data_error(dataset: str, data_dir: Path, looked_for: Iterable[str | Path],
                       how_to: str, download_note: str | None = None) -> MissingDataError:
    """A :class:`MissingDataError` naming every file looked for and where to put it.

    ``looked_for``: paths (absolute or relative to ``data_dir``) or free-form descriptions.
    ``how_to``: one or two sentences saying what to place where. ``download_note``: what the
    download attempt did (``None`` when downloads were not attempted).
    """
    lines = [f"dataset {dataset!r}: required data not found under data_dir={data_dir}.",
             "Looked for:"]
    for item in looked_for:
        lines.append(f"  - {item}")
    lines.append(how_to)
    lines.append(download_note or "Download was not attempted (download=false).")
    lines.append("Point the suite at your data folder with data_dir=/path/to/data (config or "
                 "command line) or the LAI_DATA environment variable; the default is ~/.cache/lai.")
    return MissingDataError("\n".join(lines))
