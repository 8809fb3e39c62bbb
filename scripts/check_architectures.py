"""Which model architectures the estimators run on, and how exactly (not a benchmark).

For tiny randomly initialised configs of Hugging Face and torchvision architectures (float64,
eval mode, no download), checks:

* ``ghost``: Ghost's forward form (``lai.value(..., method="ghost")``) against brute force,
  ``sum_z <g_j, g_z>`` from per-sample gradients by plain reverse mode, one sample per forward
  (``reference_values``, from the test suite's ``tests/estimators/brute.py``; no torch.func,
  so models it cannot transform are covered too);
* ``probe``: Ghost's probe form against the forward form, or why it does not apply (modules
  without a probe, or a model that defeats it at run time: ``auto`` then uses the forward
  form);
* ``lai``: LAI's folded cache against its pairwise one (two computations of Eq. 4), or the
  error that LAI gives (layers whose rows are not per sample).

Prints a Markdown table and writes ``results/compat/architectures.json`` (``--out``) with the
torch and transformers versions. ``tests/estimators/test_architectures.py`` asserts the same
checks per architecture. Usage::

    python scripts/check_architectures.py                # every architecture (about 15 s)
    python scripts/check_architectures.py --only bloom_lm,gpt2_lm
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lai import value  # noqa: E402
from lai.batching import as_batch, resolve_labels, shift_labels  # noqa: E402
from lai.estimators.online import ghost_probe  # noqa: E402
from lai.estimators.online.ghost import GhostEstimator  # noqa: E402
from tests.estimators import brute  # noqa: E402

VOCAB, LABELS, SEQ = 50, 3, 7
# relative error counted as exact in float64 (float32 rotary tables inside a float64 model,
# as in Llama, Mistral, Qwen2, Gemma, T5, give about 1e-8)
EXACT = 1e-6


def _hf(cls_name: str, config_name: str, **config: Any) -> Callable[[], nn.Module] | None:
    """A builder of ``transformers.<cls_name>(<config_name>(**config))``, or None where the
    installed transformers lacks it."""
    try:
        import transformers
    except ImportError:
        return None
    model_cls = getattr(transformers, cls_name, None)
    config_cls = getattr(transformers, config_name, None)
    if model_cls is None or config_cls is None:
        return None
    return lambda: model_cls(config_cls(**config))


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    import torchvision

    return lambda: getattr(torchvision.models, name)(**kwargs)


_SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
_ROPE = dict(_SMALL, vocab_size=VOCAB, num_key_value_heads=1, max_position_embeddings=32)

# name -> (builder or None, input kind). Kinds: "lm" (causal LM, padded), "cls" (sequence
# classifier, padded), "cls_eos" (encoder-decoder classifier: every row ends in EOS, no
# padding), "img" (HF pixel_values 8x8), "tv32"/"tv16" (torchvision images).
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module] | None, str]] = {
    "gpt2_lm": (_hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=16, n_layer=2,
                    n_head=2, n_positions=32), "lm"),
    "gpt_neo_lm": (_hf("GPTNeoForCausalLM", "GPTNeoConfig", vocab_size=VOCAB, hidden_size=16,
                       num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
                       max_position_embeddings=32, window_size=4), "lm"),
    "llama_lm": (_hf("LlamaForCausalLM", "LlamaConfig", **_ROPE), "lm"),
    "mistral_lm": (_hf("MistralForCausalLM", "MistralConfig", **_ROPE), "lm"),
    "qwen2_cls": (_hf("Qwen2ForSequenceClassification", "Qwen2Config", **_ROPE,
                      num_labels=LABELS, pad_token_id=0), "cls"),
    "gemma_lm": (_hf("GemmaForCausalLM", "GemmaConfig", **_ROPE, head_dim=8), "lm"),
    "phi_lm": (_hf("PhiForCausalLM", "PhiConfig", **_SMALL, vocab_size=VOCAB,
                   max_position_embeddings=32), "lm"),
    "opt_lm": (_hf("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=16, ffn_dim=32,
                   num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                   word_embed_proj_dim=16), "lm"),
    "gpt_neox_lm": (_hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **_SMALL, vocab_size=VOCAB,
                        max_position_embeddings=32), "lm"),
    "gpt_bigcode_lm": (_hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB,
                           n_embd=16, n_layer=2, n_head=2, n_positions=32), "lm"),
    "bloom_lm": (_hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=16,
                     n_layer=2, n_head=2), "lm"),
    "falcon_lm": (_hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=16,
                      num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32), "lm"),
    "bert_cls": (_hf("BertForSequenceClassification", "BertConfig", **_SMALL, vocab_size=VOCAB,
                     num_labels=LABELS, max_position_embeddings=32), "cls"),
    "distilbert_cls": (_hf("DistilBertForSequenceClassification", "DistilBertConfig",
                           vocab_size=VOCAB, dim=16, hidden_dim=32, n_layers=2, n_heads=2,
                           num_labels=LABELS), "cls"),
    "roberta_cls": (_hf("RobertaForSequenceClassification", "RobertaConfig", **_SMALL,
                        vocab_size=VOCAB, num_labels=LABELS, max_position_embeddings=40), "cls"),
    "albert_cls": (_hf("AlbertForSequenceClassification", "AlbertConfig", **_SMALL,
                       vocab_size=VOCAB, embedding_size=8, num_labels=LABELS,
                       max_position_embeddings=32), "cls"),
    "electra_cls": (_hf("ElectraForSequenceClassification", "ElectraConfig", **_SMALL,
                        vocab_size=VOCAB, embedding_size=8, num_labels=LABELS,
                        max_position_embeddings=32), "cls"),
    "mpnet_cls": (_hf("MPNetForSequenceClassification", "MPNetConfig", **_SMALL,
                      vocab_size=VOCAB, num_labels=LABELS, max_position_embeddings=40), "cls"),
    "deberta_v2_cls": (_hf("DebertaV2ForSequenceClassification", "DebertaV2Config", **_SMALL,
                           vocab_size=VOCAB, num_labels=LABELS, max_position_embeddings=32,
                           relative_attention=True, pos_att_type=["p2c", "c2p"],
                           position_buckets=8, max_relative_positions=16), "cls"),
    "bart_cls": (_hf("BartForSequenceClassification", "BartConfig", vocab_size=VOCAB, d_model=16,
                     encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     num_labels=LABELS, max_position_embeddings=32, pad_token_id=0,
                     eos_token_id=2, bos_token_id=1), "cls_eos"),
    "t5_cls": (_hf("T5ForSequenceClassification", "T5Config", vocab_size=VOCAB, d_model=16,
                   d_kv=8, d_ff=32, num_layers=1, num_heads=2, num_labels=LABELS,
                   pad_token_id=0, eos_token_id=2, decoder_start_token_id=0), "cls_eos"),
    "vit_img": (_hf("ViTForImageClassification", "ViTConfig", **_SMALL, image_size=8,
                    patch_size=4, num_channels=3, num_labels=LABELS), "img"),
    "convnext_img": (_hf("ConvNextForImageClassification", "ConvNextConfig", num_channels=3,
                         num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=LABELS,
                         image_size=8, patch_size=2), "img"),
    "swin_img": (_hf("SwinForImageClassification", "SwinConfig", image_size=8, patch_size=2,
                     num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                     window_size=2, num_labels=LABELS), "img"),
    "resnet18_tv": (_tv("resnet18", num_classes=LABELS), "tv32"),
    "mobilenet_v3_tv": (_tv("mobilenet_v3_small", num_classes=LABELS), "tv32"),
    "efficientnet_b0_tv": (_tv("efficientnet_b0", num_classes=LABELS), "tv32"),
    "vit_tv": (_tv("VisionTransformer", image_size=16, patch_size=8, num_layers=1, num_heads=2,
                   hidden_dim=16, mlp_dim=32, num_classes=LABELS), "tv16"),
}


def make_batch(kind: str, n: int, seed: int) -> Any:
    """A float64 batch of ``n`` rows for an input ``kind`` (see ARCHITECTURES): a dict with
    ``labels`` for Hugging Face models, an ``(images, labels)`` tuple for torchvision ones.
    Token batches pad the last two positions of row 0 (except ``cls_eos``)."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("tv32", "tv16"):
        size = 32 if kind == "tv32" else 16
        return (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
                torch.randint(0, LABELS, (n,), generator=g))
    if kind == "img":
        return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
                "labels": torch.randint(0, LABELS, (n,), generator=g)}
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    if kind == "cls_eos":
        ids[:, -1] = 2  # one EOS per row, at the end (BART/T5 classify from it)
    else:
        mask[0, -2:] = 0
    if kind == "lm":  # Hugging Face's convention: labels = the input ids, padding ignored
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, LABELS, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_values(model: nn.Module, train: Any, val: Any) -> torch.Tensor:
    """Brute-force Ghost values ``[N_train]``: ``g_j . sum_z g_z``, with per-sample gradients
    by plain reverse mode, one sample per forward (``tests/estimators/brute.py``, the
    reference the test suite uses)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def grads(b: Any) -> torch.Tensor:
        if isinstance(b, dict):
            labels = b["labels"]  # a causal LM's: position t predicts token t + 1
            labels = shift_labels(labels) if labels.dim() == 2 else labels
            return brute.per_sample_grads_autograd(model, names, brute.strip(b), labels,
                                                   kwargs=True)
        return brute.per_sample_grads_autograd(model, names, b[0], b[1])

    return grads(train) @ grads(val).sum(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _short(e: BaseException) -> str:
    """The exception's type and first line (the Markdown table shortens it further)."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"


def check(name: str) -> dict[str, Any]:
    """The three checks for one architecture. Returns ``{"arch", "available", "ghost",
    "ghost_error", "probe", "probe_note", "lai", "lai_error"}``: relative errors (float) where
    the check ran, else None with the reason in the ``*_error``/``probe_note`` field."""
    builder, kind = ARCHITECTURES[name]
    row: dict[str, Any] = {"arch": name, "available": builder is not None, "ghost": None,
                           "ghost_error": None, "probe": None, "probe_note": None,
                           "lai": None, "lai_error": None}
    if builder is None:
        return row
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = builder().double().eval()
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False
        train, val = make_batch(kind, 5, 1), make_batch(kind, 4, 2)
        try:
            forward_values = value(model, train, val, method="ghost")
            row["ghost"] = rel_err(forward_values, reference_values(model, train, val))
        except Exception as e:  # noqa: BLE001 - a compatibility report records every failure
            forward_values, row["ghost_error"] = None, _short(e)
        _, missing = ghost_probe.probe_plan(model)
        if missing:
            row["probe_note"] = (f"no probe for {len(missing)} parameter(s) (e.g. "
                                 f"{missing[0]}), auto uses forward")
        elif forward_values is not None:
            est = GhostEstimator(mode="probe")
            try:  # the refresh tries the probe form on validation rows first
                est.refresh(model, resolve_labels(model, val, as_batch(val)))
                row["probe"] = rel_err(est.probe_values(
                    model, resolve_labels(model, train, as_batch(train))), forward_values)
            except Exception as e:  # noqa: BLE001
                row["probe_note"] = f"defeated at run time, auto uses forward ({_short(e)})"
        try:
            folded = value(model, train, val, method="lai", cache="folded")
            row["lai"] = rel_err(folded, value(model, train, val, method="lai", cache="pairwise"))
        except Exception as e:  # noqa: BLE001
            row["lai_error"] = _short(e)
    return row


def _cell(err: float | None, note: str | None, width: int = 60) -> str:
    """A table cell: the relative error, else a short form of the note (whole in the JSON)."""
    if err is not None:
        return f"{err:.0e}" + ("" if err < EXACT else " (not exact)")
    note = note or "-"
    if note.startswith("no probe"):
        return "none (parameter in a module with submodules): forward"
    if note.startswith("defeated at run time"):
        return "defeated at run time: forward"
    if "cannot be attributed to samples" in note:
        return "refused: rows not per sample"
    note = note.replace("|", "/")
    return note if len(note) <= width else note[:width - 3] + "..."


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| architecture | Ghost forward vs brute force | probe vs forward | "
             "LAI folded vs pairwise |", "|---|---|---|---|"]
    for r in rows:
        if not r["available"]:
            lines.append(f"| {r['arch']} | not in this transformers | | |")
            continue
        lines.append(f"| {r['arch']} | {_cell(r['ghost'], r['ghost_error'])} | "
                     f"{_cell(r['probe'], r['probe_note'])} | "
                     f"{_cell(r['lai'], r['lai_error'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated architecture names")
    parser.add_argument("--out", default=str(ROOT / "results" / "compat"))
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(ARCHITECTURES)
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; known: {sorted(ARCHITECTURES)}")
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a convenience
        def tqdm(x, **_):
            return x
    try:
        import transformers
        transformers.logging.set_verbosity_error()  # config warnings about the tiny vocab
    except ImportError:
        pass
    rows = [check(n) for n in tqdm(names, desc="architectures")]
    print(markdown(rows))
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "transformers": tf_version,
              "python": platform.python_version(), "dtype": "float64", "exact_below": EXACT,
              "rows": rows}
    path = out / ("architectures.json" if not args.only else "architectures_subset.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
