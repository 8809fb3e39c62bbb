"""Text classification datasets: 20 Newsgroups-N, Emotion-N and four GLUE tasks.

Files under ``data_dir`` (prepared format, see ``shared/data/README.md``): one
``<folder>/<split>.jsonl.gz`` per split with ``text`` (or ``text_a``/``text_b``) and ``label``,
and ``<folder>/labels.json``. When a needed split file is absent and ``download`` is true, the
Hugging Face ``datasets`` copy is fetched and written in that format; otherwise
:class:`~lai.data.base.MissingDataError` names the missing files.

Row selection (hold-out, limits) happens on indices *before* tokenisation, so only the rows a
run uses are tokenised, once, at build time. Splits are :class:`TensorSplit` objects with
``inputs = {"input_ids", "attention_mask"}`` (``[N, max_length]`` long, right-padded) and
``trim_key="input_ids"``, so every collated batch is cut to its longest row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lai.data.base import DataBundle, TensorSplit
from lai.data.download import DownloadFailed, failure_note, hf_load_dataset
from lai.data.files import (MalformedDataError, missing_data_error, read_class_names,
                            read_jsonl_gz, write_jsonl_gz)
from lai.data.noise import symmetric_noise
from lai.data.registry import register_dataset
from lai.data.splits import derive_seed, plan_splits

# ----------------------------------------------------------------------------- tables

@dataclass
class TextTable:
    """Rows of one split: ``text`` (or first segment), optional ``text_b``, ``labels [N]`` int64."""

    text: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text)

    def take(self, rows: np.ndarray, labels: np.ndarray | None = None) -> "TextTable":
        """The given rows (optionally with replacement labels ``[len(rows)]``)."""
        pick = [int(i) for i in rows]
        return TextTable([self.text[i] for i in pick],
                         None if self.text_b is None else [self.text_b[i] for i in pick],
                         self.labels[rows] if labels is None else np.asarray(labels, np.int64))


def read_table(path: Path) -> TextTable:
    """A prepared split file as a :class:`TextTable` (``text`` or ``text_a``/``text_b`` fields)."""
    cols = read_jsonl_gz(path)
    if "text" in cols:
        text, text_b = cols["text"], None
    elif "text_a" in cols and "text_b" in cols:
        text, text_b = cols["text_a"], cols["text_b"]
    else:
        raise MalformedDataError(f"{path}: expected a 'text' or 'text_a'/'text_b' field; "
                                 f"got {sorted(cols)}")
    labels = cols.get("label")
    if labels is None or any(v is None for v in (*text, *(text_b or ()), *labels)):
        raise MalformedDataError(f"{path}: every row needs its text and an integer 'label'")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise MalformedDataError(f"{path}: 'label' must be an integer class index") from None
    return TextTable([str(t) for t in text], None if text_b is None else [str(t) for t in text_b],
                     labels)


def tokenize_table(tokenizer: Any, table: TextTable, max_length: int) -> TensorSplit:
    """Tokenise a table once into a :class:`TensorSplit`.

    Returns inputs ``input_ids``/``attention_mask`` ``[N, max_length]`` int64, labels ``[N]``,
    ``lengths [N]`` = real tokens per row (for trimming batches).
    """
    if len(table) == 0:
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return TensorSplit({"input_ids": empty, "attention_mask": empty.clone()},
                           torch.zeros(0, dtype=torch.long), "input_ids",
                           torch.zeros(0, dtype=torch.long))
    enc = tokenizer(table.text, text_pair=table.text_b, truncation=True, max_length=max_length,
                    padding="max_length", return_tensors="pt")
    ids = torch.as_tensor(enc["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(enc["attention_mask"], dtype=torch.long)
    return TensorSplit({"input_ids": ids, "attention_mask": mask},
                       torch.as_tensor(table.labels, dtype=torch.long), "input_ids", mask.sum(1))


# ----------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class TextSpec:
    """Where a text dataset lives and how it is used.

    ``test_split``: file used as the test split; ``val_split``: the dataset's own validation
    file for ``val_source=split`` (``None`` = not available, with ``val_split_refusal`` saying
    why). ``noise``: accepted ``cfg.noise`` values. ``hf``: ``(path, config)`` for
    ``datasets.load_dataset``; ``hf_columns``: HF column -> prepared field.
    """

    name: str
    folder: str
    num_classes: int
    test_split: str
    val_split: str | None
    noise: tuple[str, ...]
    hf: tuple[str, str | None]
    hf_columns: dict[str, str]
    val_split_refusal: str = ""
    notes: tuple[str, ...] = ()


_GLUE_REFUSAL = ("GLUE's validation split is this suite's test split (GLUE test labels are "
                 "hidden), so val_source=split would make val == test; use val_source=holdout")
_GLUE_NOTE = "test split = GLUE validation split (GLUE test labels are hidden)"
_NOISY = ("default", "symmetric", "none")

SPECS: dict[str, TextSpec] = {
    "news20_n": TextSpec(
        "news20_n", "20newsgroups", 20, "test", None, _NOISY, ("SetFit/20_newsgroups", None),
        {"text": "text", "label": "label"},
        val_split_refusal="20 Newsgroups has no validation split",
        notes=("raw messages (headers, quotes and signatures kept)",)),
    "emotion_n": TextSpec(
        "emotion_n", "emotion", 6, "test", "validation", _NOISY + ("paper_code",),
        ("dair-ai/emotion", None), {"text": "text", "label": "label"}),
    "glue_sst2": TextSpec(
        "glue_sst2", "glue/sst2", 2, "validation", None, ("default", "none"), ("glue", "sst2"),
        {"sentence": "text", "label": "label"}, _GLUE_REFUSAL, (_GLUE_NOTE,)),
    "glue_mrpc": TextSpec(
        "glue_mrpc", "glue/mrpc", 2, "validation", None, ("default", "none"), ("glue", "mrpc"),
        {"sentence1": "text_a", "sentence2": "text_b", "label": "label"}, _GLUE_REFUSAL,
        (_GLUE_NOTE,)),
    "glue_qnli": TextSpec(
        "glue_qnli", "glue/qnli", 2, "validation", None, ("default", "none"), ("glue", "qnli"),
        {"question": "text_a", "sentence": "text_b", "label": "label"}, _GLUE_REFUSAL,
        (_GLUE_NOTE,)),
    "glue_rte": TextSpec(
        "glue_rte", "glue/rte", 2, "validation", None, ("default", "none"), ("glue", "rte"),
        {"sentence1": "text_a", "sentence2": "text_b", "label": "label"}, _GLUE_REFUSAL,
        (_GLUE_NOTE,)),
}
EMOTION_PAPER_NOISE = "emotion/paper_noisy_labels.npz"


# ----------------------------------------------------------------------------- loading

def _download_splits(spec: TextSpec, root: Path, splits: Sequence[str]) -> None:
    """Fetch the HF copy and write the requested splits (and labels.json) in prepared format."""
    path, config = spec.hf
    ds = hf_load_dataset(path, config)
    folder = root / spec.folder
    for split in splits:
        if split not in ds:
            raise DownloadFailed(f"{path} has no {split!r} split")
        part = ds[split]
        write_jsonl_gz(folder / f"{split}.jsonl.gz",
                       {dst: list(part[src]) for src, dst in spec.hf_columns.items()})
    try:
        names = ds[splits[0]].features["label"].names
        if not (folder / "labels.json").exists():
            (folder / "labels.json").write_text(json.dumps(names, indent=1), encoding="utf-8")
    except Exception:  # class names are a nicety; the label ids are what matters
        pass


def load_text_splits(spec: TextSpec, root: Path, splits: Sequence[str],
                     download: bool) -> tuple[dict[str, TextTable], list[str], str]:
    """The requested prepared splits as tables, downloading missing ones when allowed.

    Returns ``({split: TextTable}, [files read], source)`` with source ``"prepared"`` or
    ``"download"``; raises MissingDataError naming the missing files (and what the download
    attempt said).
    """
    paths = {s: root / spec.folder / f"{s}.jsonl.gz" for s in splits}
    missing = [s for s, p in paths.items() if not p.is_file()]
    note, source = None, "prepared"
    if missing and download:
        source = "download"
        try:
            _download_splits(spec, root, missing)
        except Exception as e:  # DownloadFailed, or e.g. a read-only data_dir: never crash here
            note = failure_note(e)
        missing = [s for s, p in paths.items() if not p.is_file()]
    if missing:
        path, config = spec.hf
        hf = f"datasets.load_dataset({path!r}" + (f", {config!r})" if config else ")")
        found = [str(paths[s]) for s in splits if s not in missing]
        how_to = (f"Put the {', '.join(missing)} split(s) there as gzip JSON Lines with fields "
                  f"{'text_a, text_b' if 'text_a' in spec.hf_columns.values() else 'text'}, label "
                  f"(the download fallback is {hf}).")
        if found:
            how_to += f" Found: {', '.join(found)}."
        raise missing_data_error(spec.name, root, [paths[s] for s in missing], how_to, note)
    return {s: read_table(p) for s, p in paths.items()}, [str(p) for p in paths.values()], source


# ----------------------------------------------------------------------------- builder

def _train_labels(spec: TextSpec, cfg: Any, clean: np.ndarray, seed: int,
                  root: Path) -> tuple[np.ndarray, dict[str, Any], list[str]]:
    """Training labels for the whole pool ``[N]``, a noise description, extra files read."""
    noise = cfg.noise
    if noise not in spec.noise:
        why = (" (the paper code's 20 Newsgroups noise follows SetFit's row order, which the "
               "prepared bydate files do not share)" if spec.name == "news20_n" else "")
        raise ValueError(f"{spec.name}: noise must be one of {spec.noise}; got {noise!r}{why}")
    if spec.name.startswith("glue_") or noise == "none":
        return clean.copy(), {"noise": "none"}, []
    if noise == "paper_code":
        path = root / EMOTION_PAPER_NOISE
        if not path.is_file():
            raise missing_data_error(spec.name, root, [path],
                                     "noise=paper_code needs the paper code's noisy Emotion labels "
                                     "(train_noisy_label, train.jsonl.gz row order).")
        with np.load(path) as d:
            labels = d["train_noisy_label"].astype(np.int64)
        if len(labels) != len(clean):
            raise ValueError(f"{path}: {len(labels)} labels for {len(clean)} training rows")
        return labels, {"noise": "paper_code", "noise_source": str(path)}, [str(path)]
    labels, _ = symmetric_noise(clean, cfg.noise_rate, spec.num_classes, derive_seed(seed, "noise"))
    return labels, {"noise": "symmetric", "noise_rate_target": float(cfg.noise_rate)}, []


def build_text_classification(cfg: Any, *, data_dir: Path, seed: int,
                              tokenizer: Any = None) -> DataBundle:
    """A text classification :class:`DataBundle` (``cfg.name`` in :data:`SPECS`).

    train: tokens ``[n, max_length]`` with (noisy) labels ``[n]``; val: clean hold-out of the
    training file (or the dataset's validation file with ``val_source=split``); test: the
    test file (GLUE: the validation file). ``noisy`` is ``None`` for GLUE.
    """
    spec = SPECS[cfg.name]
    if tokenizer is None:
        raise ValueError(f"dataset {spec.name!r} is text: pass tokenizer=... to build_data")
    if cfg.val_source == "split" and spec.val_split is None:
        raise ValueError(f"{spec.name}: val_source=split is not available: "
                         f"{spec.val_split_refusal}")
    if cfg.val_source not in ("holdout", "split"):
        raise ValueError(f"val_source must be holdout or split; got {cfg.val_source!r}")
    root = Path(data_dir)
    use_split = cfg.val_source == "split"
    wanted = ["train", spec.test_split] + ([spec.val_split] if use_split else [])
    tables, files, source = load_text_splits(spec, root, wanted, bool(cfg.download))
    pool, test = tables["train"], tables[spec.test_split]
    clean = pool.labels
    labels, noise_info, extra = _train_labels(spec, cfg, clean, seed, root)
    val_table = tables[spec.val_split] if use_split else None
    plan = plan_splits(clean, len(test), cfg, seed,
                       n_val_split=None if val_table is None else len(val_table))

    tr = plan.train
    val_rows = pool.take(plan.val) if plan.val_from_pool else val_table.take(plan.val)
    L = int(cfg.max_length)
    train = tokenize_table(tokenizer, pool.take(tr, labels[tr]), L)
    val = tokenize_table(tokenizer, val_rows, L)
    test_split = tokenize_table(tokenizer, test.take(plan.test), L)

    is_glue = spec.name.startswith("glue_")
    noisy = None if is_glue else labels[tr] != clean[tr]
    info = {
        "name": spec.name, "source": source, "files": files + extra, "notes": list(spec.notes),
        "pool_size": len(pool), "test_pool_size": len(test), **plan.sizes(),
        "val_source": ("holdout (clean labels, stratified)" if plan.val_from_pool
                       else f"{spec.val_split} split (clean labels)"),
        "test_source": f"{spec.test_split} split", "max_length": L, **noise_info,
    }
    if noisy is not None:
        info["noise_rate_pool"] = float(np.mean(labels != clean))
        info["noise_rate_train"] = float(noisy.mean()) if len(noisy) else 0.0
    return DataBundle(
        name=spec.name, task="classification", num_classes=spec.num_classes,
        train=train, val=val, test=test_split, noisy=noisy,
        clean_train_labels=None if is_glue else clean[tr].copy(),
        class_names=read_class_names(root / spec.folder / "labels.json"), info=info,
    )


for _name, _spec in SPECS.items():
    register_dataset(_name, build_text_classification, text=True, folders=(_spec.folder,))
