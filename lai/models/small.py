"""Small CPU models for the demo and the tests.

They are built only from layers the estimators capture with forward hooks (``nn.Linear``,
``nn.Conv2d``, ``nn.Embedding``, norms) and every such layer is called as a module, never
through its weight functionally: a hook on a layer then sees all of that layer's work. In each
model the classifier ``head`` is the last ``nn.Linear`` registered (the "output layer").
"""
from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """``depth`` hidden ``Linear -> ReLU (-> Dropout)`` layers of width ``hidden``, then ``head``.

    Input ``[B, ...]`` float (trailing dimensions are flattened to ``in_features``);
    returns logits ``[B, num_classes]``.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, depth: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    # No conv bias: the BatchNorm shift that follows would cancel it.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),  # not in place: a hook may keep the BatchNorm output
    )


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (widths ``w, 2w, 4w``; the last two with stride 2) with
    BatchNorm and ReLU, global average pooling and a linear ``head``.

    Input ``[B, in_channels, H, W]`` float (sized for 32x32, works for any H, W >= 1);
    returns logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width, stride=1),
            _conv_bn_relu(width, 2 * width, stride=2),
            _conv_bn_relu(2 * width, 4 * width, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit ``nn.Linear`` q, k, v and out projections.

    ``nn.MultiheadAttention`` is avoided on purpose: it applies its output projection through
    the weight functionally, so a forward hook on it never sees that layer.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``x [B, T, D]``, ``key_mask [B, T]`` (True = real token) -> ``[B, T, D]``."""
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, h, T, D/h]
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)  # [B, h, T, T]
        if key_mask is not None:
            # The dtype's minimum rather than -inf: a row with no real key (an all-padding
            # sample) then gets uniform weights instead of NaN; real rows give pads weight 0.
            scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = self.drop(scores.softmax(dim=-1))
        y = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, T, D] -> [B, T, D]``."""
        x = x + self.drop(self.attn(self.ln1(x), key_mask))
        return x + self.drop(self.fc2(self.act(self.fc1(self.ln2(x)))))


class TinyTransformerClassifier(nn.Module):
    """Token embedding + learned positions, ``depth`` pre-norm blocks, final LayerNorm,
    mean pooling over real tokens (``attention_mask == 1``) and a linear ``head``.

    ``forward(input_ids [B, T], attention_mask [B, T] | None)`` returns logits
    ``[B, num_classes]``. Padding never changes a sample's output: pads are masked as
    attention keys and left out of the pooling.
    """

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 32, depth: int = 2,
                 heads: int = 2, max_len: int = 512, pad_token_id: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)  # registered last: the output layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]``. ``token_type_ids`` is accepted (BERT tokenizers emit
        it) and ignored.
        """
        t = input_ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.max_len}")
        mask = (attention_mask.bool() if attention_mask is not None
                else torch.ones_like(input_ids, dtype=torch.bool))
        x = self.embed(input_ids) + self.pos[:t]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)
