"""Causal language modelling data: Pile-uncopyrighted, or its local stand-in.

Files under ``data_dir``: ``pile/{train,validation}.jsonl.gz`` (a prepared Pile sample,
preferred) or ``pile_standin/{train,validation}.jsonl.gz`` (WikiText-2 + Project Gutenberg,
see ``shared/data/README.md``), field ``text``. Documents are tokenised without special tokens,
joined with the EOS token and cut into blocks of ``block_size`` tokens (the remainder is
dropped). Labels are the inputs shifted left by one, so ``labels[:, t]`` is the target of the
logits at position ``t`` (``-100`` at the last position), as ``per_sample_loss`` expects.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lai.batching import IGNORE_INDEX
from lai.data.base import DataBundle, TensorSplit
from lai.data.download import HF_HOST, failure_note, guarded
from lai.data.files import missing_data_error, read_jsonl_gz, write_jsonl_gz
from lai.data.registry import register_dataset
from lai.data.splits import derive_seed, holdout_count, holdout_split, limit_indices

PILE_HF = "monology/pile-uncopyrighted"
PILE_DOWNLOAD_DOCS = {"train": 20000, "validation": 2000}  # documents streamed per split
FOLDERS = {
    "pile": "Pile-uncopyrighted sample (prepared)",
    "pile_standin": ("SUBSTITUTE for the Pile: WikiText-2 (test) + Project Gutenberg stand-in "
                     "(shared/data/pile_standin), not Pile-uncopyrighted"),
}
SPLITS = ("train", "validation")


def documents_to_blocks(tokenizer: Any, texts: Sequence[str], block_size: int,
                        max_blocks: int | None = None, chunk_docs: int = 256) -> torch.Tensor:
    """Token blocks ``[n_blocks, block_size]`` int64 from documents joined with EOS.

    Documents are tokenised in chunks, in order, and tokenising stops as soon as
    ``max_blocks`` full blocks exist (so a capped run never tokenises the whole corpus).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("language modelling needs a tokenizer with an eos_token_id")
    need = None if max_blocks is None else max_blocks * block_size
    pieces: list[np.ndarray] = []
    total = 0
    for start in range(0, len(texts), chunk_docs):
        # truncation=False explicitly: some tokenizers (e.g. ByteTokenizer) truncate by default
        ids = tokenizer(list(texts[start:start + chunk_docs]), add_special_tokens=False,
                        truncation=False)["input_ids"]
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                           dtype=np.int64)
        pieces.append(flat)
        total += len(flat)
        if need is not None and total >= need:
            break
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.from_numpy(stream[: n * block_size].reshape(n, block_size).copy())


def shift_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels ``[N, T]``: ``labels[:, t] = input_ids[:, t + 1]``, last = ``-100``."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def lm_split(blocks: torch.Tensor) -> TensorSplit:
    """A :class:`TensorSplit` of blocks ``[N, T]``: ``input_ids``, an all-ones
    ``attention_mask``, and shifted labels ``[N, T]``."""
    return TensorSplit({"input_ids": blocks, "attention_mask": torch.ones_like(blocks)},
                       shift_labels(blocks))


def pool_blocks_needed(train_limit: int | None, val_size: float,
                       val_limit: int | None = None) -> int | None:
    """Smallest pool (in blocks) whose hold-out leaves ``train_limit`` training blocks and holds
    at least ``val_limit`` validation blocks; ``None`` (the whole corpus) without a train limit.
    """
    if train_limit is None:
        return None
    if val_size >= 1:
        return int(train_limit) + max(int(val_size), 0)
    n = max(int(train_limit) + 1, math.ceil(train_limit / (1 - val_size)),
            math.ceil((val_limit or 0) / val_size))
    while (n - holdout_count(n, val_size) < train_limit
           or holdout_count(n, val_size) < (val_limit or 0)):
        n += 1
    return n


def _download_pile(root: Path) -> None:
    """Stream the first documents of each split into ``root/pile`` (raises DownloadFailed)."""

    def fetch() -> None:
        import datasets  # lazy: importing datasets costs seconds

        for split in SPLITS:
            stream = datasets.load_dataset(PILE_HF, split=split, streaming=True)
            texts = [row["text"] for row in itertools.islice(stream, PILE_DOWNLOAD_DOCS[split])]
            write_jsonl_gz(root / "pile" / f"{split}.jsonl.gz", {"text": texts})

    guarded(f"streaming {PILE_HF}", fetch, HF_HOST)


def _find(root: Path) -> str | None:
    for folder in FOLDERS:
        if all((root / folder / f"{s}.jsonl.gz").is_file() for s in SPLITS):
            return folder
    return None


def build_pile(cfg: Any, *, data_dir: Path, seed: int, tokenizer: Any = None) -> DataBundle:
    """A causal-LM :class:`DataBundle`: blocks ``[n, block_size]`` with shifted labels.

    train/val: blocks of the train file (val = a seeded hold-out of ``val_size`` blocks);
    test: blocks of the validation file. With ``train_limit`` / ``test_limit`` only the
    leading documents needed for that many blocks are tokenised. ``num_classes`` = vocab size.
    """
    if tokenizer is None:
        raise ValueError("dataset 'pile' is text: pass tokenizer=... to build_data")
    if cfg.val_source != "holdout":
        raise ValueError("pile: val_source=split is not available: the validation file is the "
                         "test corpus; use val_source=holdout")
    root = Path(data_dir)
    folder = _find(root)
    note, source = None, "prepared"
    if folder is None and cfg.download:
        try:
            _download_pile(root)
            source = "download"
        except Exception as e:  # DownloadFailed, or e.g. a read-only data_dir: never crash here
            note = failure_note(e)
        folder = _find(root)
    if folder is None:
        looked = [root / f / f"{s}.jsonl.gz" for f in FOLDERS for s in SPLITS]
        raise missing_data_error(
            "pile", root, looked,
            "Put a Pile sample as pile/{train,validation}.jsonl.gz (gzip JSON Lines, field "
            f"'text'); the download fallback streams {PILE_HF} from the Hugging Face hub.", note)

    files = [str(root / folder / f"{s}.jsonl.gz") for s in SPLITS]
    bs = int(cfg.block_size)
    pool = documents_to_blocks(tokenizer, read_jsonl_gz(Path(files[0]), ["text"])["text"], bs,
                               pool_blocks_needed(cfg.train_limit, cfg.val_size,
                                                   cfg.val_limit))
    test_pool = documents_to_blocks(tokenizer, read_jsonl_gz(Path(files[1]), ["text"])["text"],
                                    bs, cfg.test_limit)
    # hold-out and caps on block indices; LM blocks have no class to stratify by
    train_idx, val_idx = holdout_split(np.zeros(len(pool)), cfg.val_size,
                                       derive_seed(seed, "val"), stratify=False)
    train_idx = limit_indices(train_idx, cfg.train_limit, derive_seed(seed, "train_limit"))
    val_idx = limit_indices(val_idx, cfg.val_limit, derive_seed(seed, "val_limit"))
    test_idx = limit_indices(np.arange(len(test_pool)), cfg.test_limit,
                             derive_seed(seed, "test_limit"))
    info = {
        "name": "pile", "source": source, "corpus": FOLDERS[folder], "files": files,
        "standin": folder == "pile_standin", "block_size": bs,
        "pool_blocks": len(pool), "test_pool_blocks": len(test_pool),
        "train": len(train_idx), "val": len(val_idx), "test": len(test_idx),
        "val_source": "holdout blocks of the train file", "test_source": "validation file blocks",
        "notes": ["labels = inputs shifted left by one (aligned with logits), last = -100"],
    }
    return DataBundle(
        name="pile", task="lm", num_classes=len(tokenizer),
        train=lm_split(pool[torch.from_numpy(train_idx)]),
        val=lm_split(pool[torch.from_numpy(val_idx)]),
        test=lm_split(test_pool[torch.from_numpy(test_idx)]),
        info=info,
    )


register_dataset("pile", build_pile, text=True, folders=tuple(FOLDERS))
