"""LAI's layer set: every linear map of its input (nn.Linear, nn.Conv1d/2d/3d, Hugging Face's
Conv1D), each against the written-out formula in float64."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import value
from lai.estimators.capture import select_layers
from tests.estimators import brute
from tests.estimators.brute import rel_err
from tests.estimators.test_lai_sequences import token_pairing_reference

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64_seeded")


class Mixed(nn.Module):
    """Conv3d on a volume, Conv1d on its flattened depth profile, an HF Conv1D, a head."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(2, 3, 2)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.hf = Conv1D(6, 4 * 27)  # out 6, in 4 * 27
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.c3(x))                   # [B, 3, 3, 3, 3]
        h = torch.tanh(self.c1(h.flatten(2)))         # [B, 4, 27]
        h = torch.tanh(self.hf(h.flatten(1)))        # [B, 6]
        return self.head(h)


def test_every_linear_map_is_a_layer_and_each_term_is_exact():
    model = Mixed()
    assert select_layers(model, "all") == ["c3", "c1", "hf", "head"]
    xt, xv = torch.randn(5, 2, 4, 4, 4), torch.randn(4, 2, 4, 4, 4)
    yt, yv = torch.randint(0, 3, (5,)), torch.randint(0, 3, (4,))
    names = ["c3", "c1", "hf", "head"]
    ref = brute.lai_pairwise(model, lambda: model(xt), lambda: model(xv), yt, yv, names)
    for cache in ("folded", "pairwise"):
        assert rel_err(value(model, (xt, yt), (xv, yv), method="lai", cache=cache), ref) < 1e-9
    # and each layer alone is its own term of the sum
    parts = [value(model, (xt, yt), (xv, yv), method="lai", layers=[n]) for n in names]
    assert rel_err(sum(parts), ref) < 1e-9


def test_gpt2_blocks_count_as_token_layers():
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=2, n_head=2, n_positions=16,
                                  attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    from tests.estimators.nets import lm_batch

    tr, va = lm_batch(3, 7, 40, 3), lm_batch(3, 7, 40, 4)
    names = select_layers(model, "all")
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "lm_head"} <= set(names)
    ref = token_pairing_reference(model, tr, va, names)
    lai = value(model, tr, va, lm_labels="aligned", method="lai")
    assert rel_err(lai, ref) < 1e-9
    assert rel_err(lai, value(model, tr, va, lm_labels="aligned", method="lai", cache="pairwise")) < 1e-9
    assert rel_err(lai, value(model, tr, va, lm_labels="aligned", method="lli")) > 1e-3  # no longer LLI alone
