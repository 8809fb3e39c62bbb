"""Every model builds offline and gives logits of the right shape; registry errors."""
from __future__ import annotations

import pytest

from lai.errors import MissingModelError
import torch

from lai.batching import forward_logits
from lai.config import ModelConfig
from lai.models import ByteTokenizer, build_model, output_layer_name
from lai.models.small import MLP, SmallCNN, TinyTransformerClassifier

TEXTS = ["a short one", "a somewhat longer sentence here", "mid length"]


@pytest.fixture(scope="module")
def text_batch() -> dict:
    return ByteTokenizer()(TEXTS, padding=True, return_tensors="pt")


def _text_model(name: str, task: str = "classification", num_classes: int = 3, **kw):
    tok = ByteTokenizer()
    cfg = ModelConfig(name=name, **kw)
    return build_model(cfg, task=task, num_classes=num_classes, vocab_size=len(tok),
                       pad_token_id=tok.pad_token_id)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_resnet18_both_stems(stem):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18", stem=stem), task="classification",
                        num_classes=10, input_shape=(3, 32, 32)).eval()
    assert forward_logits(model, torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert output_layer_name(model) == "fc"
    kernel = model.conv1.kernel_size
    assert kernel == ((7, 7) if stem == "imagenet" else (3, 3))


def test_resnet18_grayscale_input():
    model = build_model(ModelConfig(name="resnet18"), task="classification", num_classes=4,
                        input_shape=(1, 16, 16)).eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_bert_tiny(text_batch):
    torch.manual_seed(0)
    model = _text_model("bert", preset="tiny").eval()
    assert model.config._attn_implementation == "eager"
    assert forward_logits(model, dict(text_batch)).shape == (3, 3)
    assert output_layer_name(model) == "classifier"


def test_bert_attention_option(text_batch):
    """``model.attention=sdpa``: BERT with PyTorch's fused attention, the same logits as eager
    to rounding; GPT-Neo (eager only) and unknown values refused."""
    torch.manual_seed(0)
    eager = _text_model("bert", preset="tiny").eval()
    sdpa = _text_model("bert", preset="tiny", attention="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(forward_logits(sdpa, dict(text_batch)),
                               forward_logits(eager, dict(text_batch)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eager attention only"):
        _text_model("gpt_neo", preset="tiny", attention="sdpa")
    with pytest.raises(ValueError, match="eager or sdpa"):
        _text_model("bert", preset="tiny", attention="flash")


def test_gpt_neo_tiny_classification(text_batch):
    torch.manual_seed(0)
    model = _text_model("gpt_neo", preset="tiny").eval()
    assert model.config.pad_token_id == ByteTokenizer.pad_token_id
    assert forward_logits(model, dict(text_batch)).shape == (3, 3)
    assert output_layer_name(model) == "score"


def test_gpt_neo_tiny_lm(text_batch):
    torch.manual_seed(0)
    model = _text_model("gpt_neo", task="lm", num_classes=259, preset="tiny").eval()
    b, t = text_batch["input_ids"].shape
    assert forward_logits(model, dict(text_batch)).shape == (b, t, 259)
    assert output_layer_name(model) == "lm_head"


def test_mlp_flattens_trailing_dims():
    model = build_model(ModelConfig(name="mlp", hidden=16), task="classification",
                        num_classes=5, input_shape=(1, 8, 8))
    assert isinstance(model, MLP)
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 5)
    assert model(torch.randn(4, 64)).shape == (4, 5)
    assert output_layer_name(model) == "head"


def test_small_cnn():
    model = build_model(ModelConfig(name="small_cnn", hidden=8), task="classification",
                        num_classes=10, input_shape=(3, 32, 32))
    assert isinstance(model, SmallCNN)
    assert any(m.stride == (2, 2) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert output_layer_name(model) == "head"


def test_tiny_transformer_padding_is_masked(text_batch):
    torch.manual_seed(0)
    model = _text_model("tiny_transformer", hidden=32).eval()
    assert isinstance(model, TinyTransformerClassifier)
    ids, mask = text_batch["input_ids"], text_batch["attention_mask"]
    out = model(ids, mask)
    assert out.shape == (3, 3)
    extra = 7  # append more padding: real tokens and pooled output must not move
    ids2 = torch.cat([ids, torch.full((3, extra), ByteTokenizer.pad_token_id)], dim=1)
    mask2 = torch.cat([mask, torch.zeros(3, extra, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(model(ids2, mask2), out, atol=1e-5, rtol=1e-5)
    # Alone, unpadded, a sample gives the same output as inside the padded batch.
    n = int(mask[0].sum())
    torch.testing.assert_close(model(ids[:1, :n], mask[:1, :n]), out[:1], atol=1e-5, rtol=1e-5)
    assert output_layer_name(model) == "head"


def test_tiny_transformer_hooks_see_every_projection():
    model = TinyTransformerClassifier(259, 2)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.append(n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model(torch.randint(0, 256, (2, 5)))
    for h in hooks:
        h.remove()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(seen) == sorted(linears) and "blocks.0.attn.out" in seen


@pytest.mark.parametrize("name,kwargs,fits", [
    ("resnet18", dict(vocab_size=259), "bert, gpt_neo"),
    ("bert", dict(input_shape=(3, 32, 32)), "resnet18"),
    ("mlp", dict(vocab_size=259), "tiny_transformer"),
])
def test_wrong_data_kind_is_a_one_line_error(name, kwargs, fits):
    with pytest.raises(ValueError, match="models that fit") as err:
        build_model(ModelConfig(name=name), task="classification", num_classes=2, **kwargs)
    assert "\n" not in str(err.value)
    for other in fits.split(", "):
        assert other in str(err.value)


def test_wrong_task_and_unknown_name():
    with pytest.raises(ValueError, match="models that fit: gpt_neo"):
        build_model(ModelConfig(name="bert", preset="tiny"), task="lm", num_classes=259,
                    vocab_size=259)
    with pytest.raises(ValueError, match="known models: resnet18"):
        build_model(ModelConfig(name="vgg"), task="classification", num_classes=2)


def test_unknown_preset_and_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        _text_model("gpt_neo", preset="minilm")
    with pytest.raises(MissingModelError, match="model.tokenizer=bytes"):
        _text_model("bert", name_or_path=str(tmp_path / "nothing_here"))


def test_gpt_neo_pretrained_from_local_folder(tmp_path, text_batch):
    """name_or_path wins over preset; a checkpoint without pad uses eos; the vocabulary grows
    to fit a larger tokenizer."""
    torch.manual_seed(0)
    small = build_model(ModelConfig(name="gpt_neo", preset="tiny"), task="lm", num_classes=200,
                        vocab_size=200)
    small.config.eos_token_id, small.config.pad_token_id = 199, None
    small.save_pretrained(tmp_path)
    cfg = ModelConfig(name="gpt_neo", preset="tiny", name_or_path=str(tmp_path))
    model = build_model(cfg, task="classification", num_classes=4, vocab_size=259).eval()
    assert model.config.pad_token_id == 199
    assert model.get_input_embeddings().num_embeddings >= 259
    assert forward_logits(model, dict(text_batch)).shape == (3, 4)
