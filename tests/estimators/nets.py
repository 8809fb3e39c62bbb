"""Small float64 networks for the exactness tests (independent of lai.models on purpose)."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 16, classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                  nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


class CNN(nn.Module):
    """Strided, dilated and grouped convolutions with BatchNorm."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        x = torch.relu(self.bn2(self.c2(x)))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


class PaddedTransformer(nn.Module):
    """One attention block with explicit Linear projections, masked mean pooling."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3, max_len: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        h = self.emb(input_ids) + self.pos[:t]
        att = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        att = att.masked_fill(attention_mask[:, None, :] == 0, -1e9).softmax(-1)
        h = self.ln(h + self.o(att @ self.v(h)))
        h = h + torch.tanh(self.ff(h))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def token_batch(n: int, t: int, vocab: int, classes: int, seed: int) -> dict:
    """A padded token batch: random lengths in [2, t], pad id 0 after the length."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": torch.randint(0, classes, (n,), generator=g)}


def lm_batch(n: int, t: int, vocab: int, seed: int) -> dict:
    """A padded causal-LM batch; labels aligned with logits (next token, -100 = ignored)."""
    b = token_batch(n, t, vocab, 2, seed)
    labels = torch.full_like(b["input_ids"], -100)
    labels[:, :-1] = b["input_ids"][:, 1:]
    labels[:, :-1][b["attention_mask"][:, 1:] == 0] = -100
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": labels}


def tiny_bert_classifier(layers: int, vocab: int = 40, classes: int = 3) -> nn.Module:
    """A random-init HF ``BertForSequenceClassification`` (hidden 8, 2 heads) in eval mode;
    skips the test when transformers is missing."""
    import pytest

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=32, num_labels=classes,
                                  attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_lm(vocab: int = 40) -> nn.Module:
    """A random-init HF ``GPTNeoForCausalLM`` (hidden 8, one global and one local layer,
    untied head) in eval mode; skips the test when transformers is missing."""
    import pytest

    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoConfig(vocab_size=vocab, hidden_size=8, num_layers=2, num_heads=2,
                                    attention_types=[[["global", "local"], 1]],
                                    max_position_embeddings=32, intermediate_size=16,
                                    window_size=4, attn_implementation="eager",
                                    bos_token_id=None, eos_token_id=None,
                                    tie_word_embeddings=False)
    return transformers.GPTNeoForCausalLM(cfg).eval()
