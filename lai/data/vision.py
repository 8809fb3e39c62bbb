"""CIFAR-10N / CIFAR-100N: CIFAR images with real human noisy labels (Wei et al., 2022).

Lookup order (docs/design.md section 3), under ``data_dir``:

1. prepared: ``cifar10n/cifar10n.npz`` or ``cifar10n/cifar10n_first10k.npz`` (uint8 HWC
   ``train_x``, ``test_x``, ``test_y``, optional ``train_index`` and label arrays), labels
   completed from ``cifar10n/cifar10n_labels_full.npz``; for CIFAR-100N
   ``cifar100n/cifar100n.npz`` + ``cifar100n/cifar100n_labels.npz``;
2. raw: torchvision's ``cifar-10-batches-py/`` / ``cifar-100-python/`` pickles, with CIFAR-N
   labels from the labels ``.npz`` above or the release file ``CIFAR-10_human.pt`` /
   ``CIFAR-100_human.pt`` (in ``data_dir`` or its ``cifar10n/`` / ``cifar100n/`` folder);
3. when ``download`` is true: torchvision's download and the CIFAR-N release file, then (2).

Images are kept as ``torch.uint8`` ``[N, 3, 32, 32]``; :class:`CifarPreprocess` turns a batch
into normalised floats (and augments training batches) on whatever device it is on.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lai.data.base import DataBundle, TensorSplit
from lai.data.download import failure_note, fetch_url, guarded
from lai.data.files import missing_data_error, read_class_names
from lai.data.noise import resample_from_transition, transition_matrix
from lai.data.registry import register_dataset
from lai.data.splits import derive_seed, plan_splits

CIFARN_URL = "https://github.com/UCSC-REAL/cifar-10-100n/raw/main/data/{file}"
CIFAR_HOST = "www.cs.toronto.edu"  # where torchvision downloads CIFAR from


@dataclass(frozen=True)
class CifarFamily:
    """File layout of CIFAR-10(N) or CIFAR-100(N)."""

    classes: int
    folder: str                     # prepared-format folder: cifar10n / cifar100n
    prepared: tuple[str, ...]       # prepared image files, first found wins
    labels_file: str                # prepared CIFAR-N label table
    raw_folder: str                 # torchvision's extracted pickle folder
    raw_train: tuple[str, ...]
    raw_test: str
    raw_label_key: bytes            # label field inside the pickles
    human_file: str                 # CIFAR-N release file
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarFamily(
    classes=10, folder="cifar10n", prepared=("cifar10n.npz", "cifar10n_first10k.npz"),
    labels_file="cifar10n_labels_full.npz", raw_folder="cifar-10-batches-py",
    raw_train=tuple(f"data_batch_{i}" for i in range(1, 6)), raw_test="test_batch",
    raw_label_key=b"labels", human_file="CIFAR-10_human.pt",
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarFamily(
    classes=100, folder="cifar100n", prepared=("cifar100n.npz",),
    labels_file="cifar100n_labels.npz", raw_folder="cifar-100-python",
    raw_train=("train",), raw_test="test", raw_label_key=b"fine_labels",
    human_file="CIFAR-100_human.pt",
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
)

# dataset name -> (family, key of the human label in the CIFAR-N tables)
VARIANTS: dict[str, tuple[CifarFamily, str]] = {
    "cifar10n_aggre": (CIFAR10, "aggre_label"),
    "cifar10n_random1": (CIFAR10, "random_label1"),
    "cifar10n_worst": (CIFAR10, "worse_label"),
    "cifar100n": (CIFAR100, "noisy_label"),
}
PAPER_WORST_FILE = "cifar10n/paper_code_worst_labels.npz"
NOISE_KINDS = ("default", "human", "paper_code")


# ----------------------------------------------------------------------------- preprocessing

def random_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Batched random crop (zero padding ``padding`` px) and random horizontal flip.

    ``x`` ``[B, C, H, W]`` -> ``[B, C, H, W]``, same dtype and device. One gather for the whole
    batch: per-image row/column index vectors (offset, reversed when flipped) pick the crop
    out of the padded batch, so there is no per-image Python loop.
    """
    b, _, h, w = x.shape
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b, 1), device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b, 1), device=dev)
    flip = torch.rand(b, 1, device=dev) < 0.5
    ar_w = torch.arange(w, device=dev)
    rows = oy + torch.arange(h, device=dev)                        # [B, H]
    cols = ox + torch.where(flip, (w - 1) - ar_w, ar_w)            # [B, W]
    bi = torch.arange(b, device=dev)[:, None, None]
    # channels-last view so the three advanced indices give [B, H, W, C] directly
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


class CifarPreprocess:
    """``(uint8 [B,3,H,W], train) -> float32 [B,3,H,W]`` normalised with the dataset mean/std.

    Runs on the inputs' device. With ``train=True`` and ``augment``: random crop (4 px zero
    padding, applied before normalisation as torchvision's ``RandomCrop`` does) and flip.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: bool = True):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # one host-to-device copy per device, not two per batch
        if device not in self._on:
            self._on[device] = (self.mean.to(device), self.std.to(device))
        return self._on[device]

    def __call__(self, inputs: torch.Tensor, train: bool) -> torch.Tensor:
        x = inputs.float() / 255.0 if inputs.dtype == torch.uint8 else inputs.float()
        if train and self.augment:
            x = random_crop_flip(x, padding=4)
        mean, std = self._stats(x.device)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"CifarPreprocess(augment={self.augment})"


# ----------------------------------------------------------------------------- loading

@dataclass
class CifarPool:
    """The full training pool and test set as loaded, before any split.

    ``train_x`` uint8 ``[N, 3, 32, 32]``; ``train_index`` ``[N]`` positions in the original
    50,000-image order; ``labels``: CIFAR-N label arrays ``[N]`` (``clean_label`` and the human
    variants); ``test_x`` ``[M, 3, 32, 32]``, ``test_y`` ``[M]`` (clean).
    """

    train_x: np.ndarray
    train_index: np.ndarray
    labels: dict[str, np.ndarray]
    test_x: np.ndarray
    test_y: np.ndarray
    source: str
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _hwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(0, 3, 1, 2))


def _label_table_candidates(root: Path, fam: CifarFamily) -> list[Path]:
    return [root / fam.folder / fam.labels_file, root / fam.folder / fam.human_file,
            root / fam.human_file]


def _load_label_table(root: Path, fam: CifarFamily) -> tuple[dict[str, np.ndarray], Path] | None:
    """CIFAR-N labels for all 50,000 training images (original order), or ``None``.

    Returns ``({key: [50000] int64, ..., "train_index": ...}, file used)``.
    """
    for path in _label_table_candidates(root, fam):
        if not path.is_file():
            continue
        if path.suffix == ".npz":
            with np.load(path) as d:
                table = {k: np.asarray(d[k]) for k in d.files if d[k].dtype.kind in "iu"}
        else:
            # the CIFAR-N release is a pickled dict of numpy arrays, not a tensor file, so
            # weights_only loading cannot read it; it is the published label file
            raw = torch.load(path, map_location="cpu", weights_only=False)
            table = {k: np.asarray(v) for k, v in dict(raw).items()
                     if np.asarray(v).dtype.kind in "iu" and np.asarray(v).ndim == 1}
        table = {k: v.astype(np.int64) for k, v in table.items()}
        n = len(next(iter(table.values())))
        table.setdefault("train_index", np.arange(n, dtype=np.int64))
        return table, path
    return None


def _align(table: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a label table for the given original indices ``[N]``."""
    pos = np.full(int(max(table["train_index"].max(), index.max())) + 1, -1, dtype=np.int64)
    pos[table["train_index"]] = np.arange(len(table["train_index"]))
    rows = pos[index]
    if (rows < 0).any():
        raise ValueError("the CIFAR-N label table does not cover every training image")
    return {k: v[rows] for k, v in table.items() if k != "train_index"}


def _from_prepared(root: Path, fam: CifarFamily, label_key: str) -> CifarPool | None:
    for name in fam.prepared:
        path = root / fam.folder / name
        if not path.is_file():
            continue
        with np.load(path) as d:
            keys = set(d.files)
            if not {"train_x", "test_x", "test_y"} <= keys:
                continue
            raw_x = None  # each npz access decompresses the array: read images at most once
            if "train_index" in keys:
                index = d["train_index"].astype(np.int64)
            else:
                raw_x = d["train_x"]
                index = np.arange(raw_x.shape[0], dtype=np.int64)
            labels = {k: d[k].astype(np.int64) for k in ("clean_label", label_key) if k in keys}
            files = [str(path)]
            if len(labels) < 2:  # labels not inside the image file: complete them from a table
                found = _load_label_table(root, fam)
                if found is None or not {label_key, "clean_label"} <= set(found[0]):
                    continue  # checked before decoding the (large) image arrays
                labels = {**_align(found[0], index), **labels}
                files.append(str(found[1]))
            train_x = _hwc_to_nchw(d["train_x"] if raw_x is None else raw_x)
            test_x, test_y = _hwc_to_nchw(d["test_x"]), d["test_y"].astype(np.int64)
        notes = []
        if name.endswith("first10k.npz"):
            notes.append(f"prepared subset: first {len(train_x)} training / {len(test_x)} test "
                         "images (JPEG-decoded substitutes of the CIFAR pixels, see the data "
                         "README)")
        return CifarPool(train_x, index, labels, test_x, test_y, "prepared", files, notes)
    return None


def _read_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _from_raw(root: Path, fam: CifarFamily, label_key: str,
              problems: list[str]) -> CifarPool | None:
    folder = root / fam.raw_folder
    paths = [folder / n for n in (*fam.raw_train, fam.raw_test)]
    if not all(p.is_file() for p in paths):
        return None
    found = _load_label_table(root, fam)
    if found is None:
        problems.append(f"raw images found in {folder} but no CIFAR-N label file")
        return None
    try:
        parts = [_read_pickle(p) for p in paths]
    except Exception as e:  # truncated or foreign pickles: report, don't crash
        problems.append(f"could not read the pickles in {folder}: {type(e).__name__}: {e}")
        return None

    def images(d: dict) -> np.ndarray:
        return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # already NCHW

    train_x = np.concatenate([images(d) for d in parts[:-1]])
    train_y = np.concatenate([np.asarray(d[fam.raw_label_key], dtype=np.int64) for d in parts[:-1]])
    table, table_path = found
    if label_key not in table:
        problems.append(f"{table_path} has no {label_key!r} labels")
        return None
    index = np.arange(len(train_x), dtype=np.int64)
    labels = _align(table, index)
    labels.setdefault("clean_label", train_y)
    test_x = images(parts[-1])
    test_y = np.asarray(parts[-1][fam.raw_label_key], dtype=np.int64)
    return CifarPool(train_x, index, labels, test_x, test_y, "raw",
                     [str(folder), str(table_path)])


def _download(root: Path, fam: CifarFamily) -> None:
    """torchvision's CIFAR download into ``root``, then the CIFAR-N label file.

    Raises :class:`~lai.data.download.DownloadFailed` (or OSError) on any failure.
    """
    import torchvision

    cls = torchvision.datasets.CIFAR10 if fam.classes == 10 else torchvision.datasets.CIFAR100
    if not all((root / fam.raw_folder / n).is_file() for n in (*fam.raw_train, fam.raw_test)):
        guarded(f"torchvision.datasets.{cls.__name__}(root={root}, download=True)",
                lambda: cls(root=str(root), train=True, download=True), CIFAR_HOST)
    if _load_label_table(root, fam) is None:
        fetch_url(CIFARN_URL.format(file=fam.human_file), root / fam.folder / fam.human_file)


def load_cifar_pool(root: Path, name: str, download: bool) -> CifarPool:
    """The training pool and test set of a CIFAR-N variant, by the lookup order above.

    Raises :class:`~lai.data.base.MissingDataError` naming every file looked for.
    """
    fam, label_key = VARIANTS[name]
    pool = _from_prepared(root, fam, label_key)
    problems: list[str] = []
    if pool is None:
        pool = _from_raw(root, fam, label_key, problems)
    note = None
    if pool is None and download:
        try:
            _download(root, fam)
            pool = _from_raw(root, fam, label_key, problems)
            if pool is not None:
                pool.source = "download"
        except Exception as e:  # DownloadFailed, or e.g. a read-only data_dir: never crash here
            note = failure_note(e)
    if pool is not None:
        return pool
    raise _missing(root, fam, label_key, name, problems, note)


def _missing(root: Path, fam: CifarFamily, label_key: str, name: str, problems: list[str],
             note: str | None) -> Exception:
    raw = root / fam.raw_folder
    looked = [root / fam.folder / n for n in fam.prepared]
    looked += [f"{raw}/{{{','.join((*fam.raw_train, fam.raw_test))}}}"]
    tables = _label_table_candidates(root, fam)
    looked += [f"{p} (CIFAR-N labels, key {label_key!r})" for p in tables]
    have = [str(p) for p in tables if p.is_file()]
    base = "CIFAR-10" if fam.classes == 10 else "CIFAR-100"
    how_to = (f"Either put a prepared {fam.folder}/{fam.prepared[0]} (uint8 HWC train_x, test_x, "
              f"test_y) with {fam.folder}/{fam.labels_file}, or extract {base}'s python version "
              f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {raw}/ and put "
              f"{fam.human_file} (https://github.com/UCSC-REAL/cifar-10-100n) into "
              f"{root / fam.folder}/.")
    if have:
        how_to += f" Found labels only ({', '.join(have)}): the {base} images are missing."
    for p in problems:
        how_to += f" Note: {p}."
    return missing_data_error(name, root, looked, how_to, note)


# ----------------------------------------------------------------------------- builder

def _noisy_labels(name: str, pool: CifarPool, label_key: str, noise: str, seed: int,
                  root: Path, classes: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Training labels for the whole pool ``[N]`` and a description of where they came from."""
    clean, human = pool.labels["clean_label"], pool.labels[label_key]
    if noise in ("default", "human"):
        return human, {"noise": "human", "label_key": label_key}
    if noise != "paper_code":
        raise ValueError(f"{name}: noise must be one of {NOISE_KINDS}; got {noise!r}")
    paper = root / PAPER_WORST_FILE
    if name == "cifar10n_worst" and paper.is_file():
        with np.load(paper) as d:
            table = {"train_index": d["train_index"].astype(np.int64),
                     "label": d["label"].astype(np.int64)}
        pool.files.append(str(paper))
        return _align(table, pool.train_index)["label"], {
            "noise": "paper_code", "noise_source": "exact labels of the paper's code"}
    T = transition_matrix(clean, human, classes)
    labels = resample_from_transition(clean, T, derive_seed(seed, "noise"))
    return labels, {"noise": "paper_code", "noise_source":
                    f"resampled from the clean->{label_key} transition matrix "
                    f"(estimated on {len(clean)} pool rows), seeded"}


def build_cifar(cfg: Any, *, data_dir: Path, seed: int, tokenizer: Any = None) -> DataBundle:
    """A CIFAR-N :class:`DataBundle` (``cfg.name`` in :data:`VARIANTS`).

    train: uint8 ``[n, 3, 32, 32]`` with noisy labels ``[n]``; val: clean hold-out of the
    training pool (``val_size``); test: test images with clean labels.
    """
    name = cfg.name
    fam, label_key = VARIANTS[name]
    if cfg.val_source != "holdout":
        raise ValueError(f"{name}: val_source={cfg.val_source!r} is not available: CIFAR-N has "
                         "no validation split of its own (the paper holds out 5,000 of the "
                         "50,000 training images); use val_source=holdout with val_size")
    root = Path(data_dir)
    pool = load_cifar_pool(root, name, bool(cfg.download))
    clean = pool.labels["clean_label"]
    train_labels, noise_info = _noisy_labels(name, pool, label_key, cfg.noise, seed, root,
                                             fam.classes)
    plan = plan_splits(clean, len(pool.test_y), cfg, seed)

    def split(x: np.ndarray, y: np.ndarray) -> TensorSplit:
        return TensorSplit(torch.from_numpy(x), torch.from_numpy(y))

    tr, va, te = plan.train, plan.val, plan.test
    noisy = train_labels[tr] != clean[tr]
    class_names = read_class_names(root / fam.folder / "labels.json")
    info = {
        "name": name, "source": pool.source, "files": pool.files, "notes": pool.notes,
        "pool_size": len(clean), "test_pool_size": len(pool.test_y), **plan.sizes(),
        "val_source": "holdout (clean labels, stratified)", **noise_info,
        "noise_rate_pool": float(np.mean(train_labels != clean)),
        "noise_rate_train": float(noisy.mean()) if len(noisy) else 0.0,
        "test_source": "CIFAR test images, clean labels",
    }
    return DataBundle(
        name=name, task="classification", num_classes=fam.classes,
        train=split(pool.train_x[tr], train_labels[tr]),
        val=split(pool.train_x[va], clean[va]),
        test=split(pool.test_x[te], pool.test_y[te]),
        noisy=noisy, clean_train_labels=clean[tr].copy(),
        preprocess=CifarPreprocess(fam.mean, fam.std, augment=bool(cfg.augment)),
        class_names=class_names, info=info,
    )


for _name, (_family, _) in VARIANTS.items():
    register_dataset(_name, build_cifar, folders=(_family.folder,))
