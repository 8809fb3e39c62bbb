"""Model registry: ``model.name`` -> a builder, and what data each model fits.

:func:`build_model` is the one entry point the runners use. It checks that the model fits
the data before building it, so a wrong pairing (``resnet18`` on SST-2, ``bert`` on CIFAR)
stops with a one-line message that names the models that do fit.
"""
from __future__ import annotations


import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from lai.models.hf import bert, gpt_neo
from lai.models.resnet import resnet18
from lai.models.small import MLP, SmallCNN, TinyTransformerClassifier

# A builder gets the model config and what the data says about itself.
Builder = Callable[[Any, str, int, "tuple | None", "int | None", "int | None"], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A builder, the input kinds it takes (``image``/``vector``/``text``) and its tasks."""

    build: Builder
    inputs: tuple[str, ...]
    tasks: tuple[str, ...]
    about: str = ""


def _channels(input_shape: tuple | None) -> int:
    return int(input_shape[0]) if input_shape else 3


def _build_resnet18(cfg, task, num_classes, input_shape, vocab_size, pad_token_id):
    return resnet18(num_classes, stem=getattr(cfg, "stem", "imagenet"),
                    in_channels=_channels(input_shape))


def _build_small_cnn(cfg, task, num_classes, input_shape, vocab_size, pad_token_id):
    return SmallCNN(num_classes, in_channels=_channels(input_shape),
                    width=getattr(cfg, "hidden", 16))


def _build_mlp(cfg, task, num_classes, input_shape, vocab_size, pad_token_id):
    if input_shape is None:
        raise ValueError("model mlp needs input_shape (the shape of one sample) to size its input")
    return MLP(math.prod(int(d) for d in input_shape), num_classes,
               hidden=getattr(cfg, "hidden", 128), depth=getattr(cfg, "depth", 2),
               dropout=getattr(cfg, "dropout", 0.0))


def _build_tiny_transformer(cfg, task, num_classes, input_shape, vocab_size, pad_token_id):
    if vocab_size is None:
        raise ValueError("model tiny_transformer needs vocab_size (the tokenizer's length)")
    return TinyTransformerClassifier(
        vocab_size, num_classes, dim=getattr(cfg, "hidden", 32), depth=getattr(cfg, "depth", 2),
        pad_token_id=0 if pad_token_id is None else pad_token_id,
        dropout=getattr(cfg, "dropout", 0.0),
    )


def _build_bert(cfg, task, num_classes, input_shape, vocab_size, pad_token_id):
    return bert(cfg, task, num_classes, vocab_size, pad_token_id)


def _build_gpt_neo(cfg, task, num_classes, input_shape, vocab_size, pad_token_id):
    return gpt_neo(cfg, task, num_classes, vocab_size, pad_token_id)


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(_build_resnet18, ("image",), ("classification",),
                          "torchvision ResNet-18 (stem imagenet | cifar)"),
    "small_cnn": ModelSpec(_build_small_cnn, ("image",), ("classification",),
                           "3 conv blocks + linear head (width = hidden)"),
    "mlp": ModelSpec(_build_mlp, ("image", "vector"), ("classification",),
                     "depth x Linear+ReLU of width hidden + linear head"),
    "tiny_transformer": ModelSpec(_build_tiny_transformer, ("text",), ("classification",),
                                  "small encoder, explicit Linear attention, mean pooling"),
    "bert": ModelSpec(_build_bert, ("text",), ("classification",),
                      "Hugging Face BERT (preset tiny | minilm, or name_or_path)"),
    "gpt_neo": ModelSpec(_build_gpt_neo, ("text",), ("classification", "lm"),
                         "Hugging Face GPT-Neo (preset tiny, or name_or_path)"),
}


def input_kind(task: str, input_shape: tuple | None, vocab_size: int | None) -> str | None:
    """What the data looks like: ``text`` when it has a vocabulary (or is language
    modelling), ``image`` for a ``(C, H, W)`` sample shape, ``vector`` for other shapes,
    ``None`` when nothing is known (then only the task is checked).
    """
    if task == "lm" or vocab_size is not None:
        return "text"
    if input_shape is None:
        return None
    return "image" if len(input_shape) == 3 else "vector"


def build_model(cfg: Any, *, task: str, num_classes: int, input_shape: tuple | None = None,
                vocab_size: int | None = None, pad_token_id: int | None = None) -> nn.Module:
    """Build the network that ``cfg.name`` names (a :class:`lai.config.ModelConfig`).

    ``task``: ``classification`` or ``lm``; ``num_classes``: classes (for ``lm``, the
    vocabulary size); ``input_shape``: one sample's shape without the batch dimension (vision
    and vector data); ``vocab_size``/``pad_token_id``: the tokenizer's (text data; giving
    ``vocab_size`` marks the data as text).

    Returns an ``nn.Module`` whose logits (the output itself, or its ``.logits``) are
    ``[B, num_classes]`` for classification and ``[B, T, V]`` for ``lm``. Raises
    ``ValueError`` for an unknown name or a model that does not fit the data.
    """
    name = cfg.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    kind = input_kind(task, input_shape, vocab_size)
    spec = MODELS[name]
    if task not in spec.tasks or (kind is not None and kind not in spec.inputs):
        fit = [n for n, s in MODELS.items()
               if task in s.tasks and (kind is None or kind in s.inputs)]
        data = f"{kind} data" if kind else "this data"
        raise ValueError(
            f"model {name!r} does not fit {data} with task {task!r}; models that fit: "
            f"{', '.join(fit) or 'none'}"
        )
    return spec.build(cfg, task, num_classes, input_shape, vocab_size, pad_token_id)
