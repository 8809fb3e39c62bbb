"""Networks and tokenizers: ``build_model(cfg, task=..., num_classes=...)`` and
``build_tokenizer(spec, model_cfg)``.

Vision: torchvision ResNet-18 (:mod:`lai.models.resnet`). Text: Hugging Face BERT and GPT-Neo
(:mod:`lai.models.hf`). CPU demo/test models: :mod:`lai.models.small`. Transformers is
imported only when a text model or a Hugging Face tokenizer is built.
"""
from lai.estimators.capture import output_layer_name
from lai.models.registry import MODELS, ModelSpec, build_model, input_kind
from lai.models.resnet import resnet18
from lai.models.small import MLP, SmallCNN, TinyTransformerClassifier
from lai.models.tokenizers import ByteTokenizer, build_tokenizer, minilm_path

__all__ = [
    "MODELS", "ModelSpec", "build_model", "input_kind", "output_layer_name", "resnet18",
    "MLP", "SmallCNN", "TinyTransformerClassifier", "ByteTokenizer", "build_tokenizer",
    "minilm_path",
]
