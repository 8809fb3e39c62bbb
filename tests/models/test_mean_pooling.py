"""model.pooling=mean: a BERT classifier on the masked mean of its last hidden states."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lai import value
from lai.config import ConfigError, validate
from lai.models.hf import MeanPooledBert
from tests.conftest import compose_cfg
from tests.estimators import brute
from tests.estimators.nets import token_batch


def _tiny(dtype=torch.float64) -> MeanPooledBert:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=16, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return MeanPooledBert(BertForSequenceClassification(cfg)).to(dtype).eval()


def test_logits_are_the_head_of_the_masked_mean():
    model = _tiny()
    b = token_batch(4, 6, 30, 3, seed=0)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    h = model.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
    assert torch.allclose(out, model.classifier((h * m).sum(1) / m.sum(1)))
    assert model.bert.pooler is None and out.shape == (4, 3)


def test_ghost_and_lai_exact_on_the_mean_pooled_model(float64_seeded):
    model = _tiny()
    tr, va = token_batch(5, 6, 30, 3, seed=1), token_batch(3, 6, 30, 3, seed=2)
    names = [n for n, _ in model.named_parameters()]
    g = brute.per_sample_grads(model, names, {k: tr[k] for k in ("input_ids", "attention_mask")},
                               tr["labels"], kwargs=True)
    gv = brute.per_sample_grads(model, names, {k: va[k] for k in ("input_ids", "attention_mask")},
                                va["labels"], kwargs=True)
    ref = g @ gv.sum(0)
    got = value(model, tr, va, method="ghost")
    assert float((got - ref).norm() / ref.norm()) < 1e-9
    folded = value(model, tr, va, method="lai", cache="folded")
    assert torch.allclose(folded, value(model, tr, va, method="lai", cache="pairwise"),
                          rtol=1e-9)


def test_pooling_is_checked():
    with pytest.raises(ConfigError, match="model.pooling"):
        validate(compose_cfg("model=bert_minilm", "model.pooling=max", "dataset=emotion_n"))
