"""Recorded checksums of the prepared data files, checked before a dataset is built.

``lai/data/checksums.json`` maps a file's path relative to the data folder to its size and
sha256 (``{"cifar10n/labels.json": {"size": 123, "sha256": "..."}}``). Before a dataset is
built, every recorded file in that dataset's folders that is present under ``data_dir`` is
checked: a truncated or altered file raises :class:`CorruptDataError` naming the file. Files
that are not recorded (e.g. downloads, a user's own prepared copy at another path) are not
checked. Regenerate the registry with ``python scripts/make_checksums.py /path/to/data``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lai.errors import MissingResourceError

REGISTRY = Path(__file__).with_name("checksums.json")
_VERIFIED: dict[tuple[str, int, int], bool] = {}  # (path, size, mtime_ns): checked this process


class CorruptDataError(MissingResourceError):
    """A data file does not match its recorded size / sha256 (one-line message)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_registry(path: Path = REGISTRY) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def make_registry(data_dir: Path, suffixes=(".npz", ".gz", ".json", ".npy", ".pt")) -> dict:
    """``{relative path: {"size", "sha256"}}`` for every data file under ``data_dir``."""
    data_dir = Path(data_dir)
    out = {}
    for p in sorted(data_dir.rglob("*")):
        if p.is_file() and p.name.endswith(suffixes):
            rel = p.relative_to(data_dir).as_posix()
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def verify_files(data_dir: Path, folders: tuple[str, ...],
                 registry: dict[str, dict] | None = None) -> int:
    """Check every recorded file under ``data_dir/<folder>`` that exists; returns how many
    were checked. Raises :class:`CorruptDataError` for the first one that does not match."""
    registry = load_registry() if registry is None else registry
    data_dir = Path(data_dir)
    checked = 0
    for rel, rec in registry.items():
        if not any(rel == f or rel.startswith(f + "/") for f in folders):
            continue
        path = data_dir / rel
        if not path.is_file():
            continue  # absent files are the builder's business (MissingDataError)
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if _VERIFIED.get(key):
            checked += 1
            continue
        if st.st_size != rec["size"]:
            raise CorruptDataError(
                f"data file {path} does not match its recorded checksum: {st.st_size} bytes, "
                f"expected {rec['size']} (truncated or replaced?); restore it from "
                "shared/data or delete it")
        if sha256_file(path) != rec["sha256"]:
            raise CorruptDataError(
                f"data file {path} does not match its recorded checksum (sha256 differs; "
                "corrupted or replaced?); restore it from shared/data or delete it")
        _VERIFIED[key] = True
        checked += 1
    return checked
