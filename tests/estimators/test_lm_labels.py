"""Token labels: Hugging Face causal-LM labels (the input ids) in Hugging Face's convention,
other conventions said explicitly, never a silent wrong value."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import pairwise, value
from lai.batching import as_batch, shift_labels
from tests.estimators.brute import rel_err

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("float64_seeded")


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def hf_batch(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 30, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, -2:] = 0  # one padded sample
    labels = ids.masked_fill(mask == 0, -100)  # Hugging Face style: labels = input ids
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def model_loss_gradients(model, batch, own_loss: bool = False):
    """Per sample: the gradient of its loss in Hugging Face's convention: logits[t] predicts
    labels[t + 1], -100 ignored, the mean over the sample's predicted positions. Written
    out in float64, or (``own_loss``) the model's own ``.loss`` (computed in float32)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(batch["labels"])):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        if own_loss:
            loss = model(**one).loss
        else:
            logits = model(**{k: v for k, v in one.items() if k != "labels"}).logits
            loss = nn.functional.cross_entropy(logits[0, :-1], one["labels"][0, 1:],
                                               ignore_index=-100)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_hf_causal_lm_labels_are_shifted_as_the_model_does():
    model = gpt2()
    tr, va = hf_batch(4, 7, 1), hf_batch(3, 7, 2)
    gt, gv = model_loss_gradients(model, tr), model_loss_gradients(model, va)
    ref = gt @ gv.sum(0)
    own = model_loss_gradients(model, tr, True) @ model_loss_gradients(model, va, True).sum(0)
    assert rel_err(own, ref) < 1e-6  # the model's own loss, up to its float32 upcast
    assert rel_err(value(model, tr, va, method="ghost"), ref) < 1e-9
    assert rel_err(value(model, tr, va, method="ip"), ref) < 1e-9
    assert rel_err(pairwise(model, tr, va, method="ghost"), gt @ gv.T) < 1e-9
    # the same labels, said to be aligned already, are a different (wrong) game
    assert rel_err(value(model, tr, va, method="ghost", lm_labels="aligned"), ref) > 0.05
    # explicit conventions agree with auto / with a Batch built from aligned labels
    assert rel_err(value(model, tr, va, method="lli", lm_labels="hf"),
                   value(model, tr, va, method="lli")) < 1e-12
    aligned = {**tr, "labels": shift_labels(tr["labels"])}
    assert rel_err(value(model, as_batch(aligned), as_batch({**va, "labels": shift_labels(
        va["labels"])}), method="ghost"), ref) < 1e-9


class TinyTokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(30, 8), nn.Linear(8, 30)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.emb(input_ids))


def test_other_models_with_token_labels_must_say_which_convention():
    model = TinyTokenModel().double()
    tr, va = hf_batch(3, 5, 3), hf_batch(2, 5, 4)
    with pytest.raises(ValueError, match="lm_labels='hf'.*lm_labels='aligned'"):
        value(model, tr, va, method="lai")
    hf = value(model, tr, va, method="ghost", lm_labels="hf")
    al = value(model, {**tr, "labels": shift_labels(tr["labels"])},
               {**va, "labels": shift_labels(va["labels"])}, method="ghost",
               lm_labels="aligned")
    assert rel_err(hf, al) < 1e-12
    with pytest.raises(ValueError, match="lm_labels='shifted' is not one of"):
        value(model, tr, va, method="ghost", lm_labels="shifted")


def test_hf_token_classifiers_keep_their_labels_aligned():
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, num_labels=4,
                                  attn_implementation="eager")
    model = transformers.BertForTokenClassification(cfg).double().eval()
    b = hf_batch(3, 6, 5)
    b["labels"] = torch.randint(0, 4, (3, 6))
    v = value(model, b, b, method="ghost")
    assert rel_err(v, value(model, b, b, method="ghost", lm_labels="aligned")) < 1e-12


def test_hf_masked_lm_labels_are_used_as_given():
    """A masked LM's labels (-100 except at masked positions) are aligned: the per-sample loss
    is the model's own masked-LM loss of that sample."""
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    model = transformers.BertForMaskedLM(cfg).double().eval()

    def batch(n, seed):
        b = hf_batch(n, 6, seed)
        g = torch.Generator().manual_seed(seed + 10)
        masked = torch.rand(b["input_ids"].shape, generator=g) < 0.4
        masked[:, 0] = True  # at least one labelled position per row
        b["labels"] = b["input_ids"].masked_fill(~masked, -100)
        return b

    tr, va = batch(4, 5), batch(3, 6)
    own = model_loss_gradients(model, tr, True) @ model_loss_gradients(model, va, True).sum(0)
    assert rel_err(value(model, tr, va, method="ghost"), own) < 1e-9
