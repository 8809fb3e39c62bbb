"""value(..., "lai"/"lli") against brute force, float64, several architectures."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import value
from tests.estimators import brute
from tests.estimators.brute import rel_err
from tests.estimators.nets import CNN, MLP, PaddedTransformer, tiny_bert_classifier, token_batch

REL = 1e-6


def linear_conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def mlp_case():
    model = MLP()
    xt, xv = torch.randn(7, 12), torch.randn(9, 12)
    yt, yv = torch.randint(0, 5, (7,)), torch.randint(0, 5, (9,))
    return model, (xt, yt), (xv, yv)


def cnn_case(train_mode: bool):
    model = CNN()
    model.train(train_mode)
    xt, xv = torch.randn(6, 3, 10, 10), torch.randn(5, 3, 10, 10)
    yt, yv = torch.randint(0, 4, (6,)), torch.randint(0, 4, (5,))
    return model, (xt, yt), (xv, yv)


@pytest.mark.parametrize("cache", ["folded", "pairwise", "auto"])
@pytest.mark.parametrize("case", ["mlp", "cnn_eval", "cnn_train"])
def test_lai_equals_pairwise_bruteforce(case, cache):
    model, (xt, yt), (xv, yv) = {"mlp": mlp_case, "cnn_eval": lambda: cnn_case(False),
                                 "cnn_train": lambda: cnn_case(True)}[case]()
    names = linear_conv_names(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mode = model.training
    v = value(model, (xt, yt), (xv, yv), method="lai", cache=cache)
    for k, t in model.state_dict().items():  # parameters and buffers untouched
        assert torch.equal(t, before[k]), k
    assert model.training == mode
    # the reference runs the same forwards (in train mode BatchNorm uses batch statistics)
    ref = brute.lai_pairwise(model, lambda: model(xt), lambda: model(xv), yt, yv, names)
    assert v.shape == (len(yt),) and v.dtype == torch.float64
    assert rel_err(v, ref) < REL


@pytest.mark.parametrize("cache", ["folded", "pairwise"])
def test_lai_transformer_with_padding(cache):
    model = PaddedTransformer()
    tr = token_batch(6, 9, 30, 3, seed=1)
    va = token_batch(5, 12, 30, 3, seed=2)  # padded to a different length than the train batch
    names = linear_conv_names(model)
    v = value(model, tr, va, method="lai", cache=cache)
    ref = brute.lai_pairwise(
        model, lambda: model(tr["input_ids"], tr["attention_mask"]),
        lambda: model(va["input_ids"], va["attention_mask"]), tr["labels"], va["labels"], names,
        tr["attention_mask"], va["attention_mask"])
    assert rel_err(v, ref) < REL
    # padding positions carry no value: extra padding leaves the values unchanged
    padded = {k: torch.nn.functional.pad(t, (0, 3)) if t.dim() == 2 else t for k, t in tr.items()}
    assert rel_err(value(model, padded, va, method="lai", cache=cache), v) < REL


def lli_reference(model, head: str, tr_in, tr_y, va_in, va_y, kwargs=False):
    names = [f"{head}.weight"]
    gt = brute.per_sample_grads(model, names, tr_in, tr_y, kwargs)
    gv = brute.per_sample_grads(model, names, va_in, va_y, kwargs)
    return gt @ gv.sum(0)


@pytest.mark.parametrize("case", ["mlp", "cnn_eval"])
def test_lli_equals_torch_func_output_weight_gradients(case):
    model, (xt, yt), (xv, yv) = {"mlp": mlp_case, "cnn_eval": lambda: cnn_case(False)}[case]()
    head = "head" if case == "mlp" else "fc"
    ref = lli_reference(model, head, xt, yt, xv, yv)
    for cache in ("folded", "pairwise"):
        assert rel_err(value(model, (xt, yt), (xv, yv), method="lli", cache=cache), ref) < REL


def test_lli_transformer_with_padding_torch_func():
    model = PaddedTransformer().eval()
    tr, va = token_batch(5, 8, 30, 3, seed=3), token_batch(4, 8, 30, 3, seed=4)
    ref = lli_reference(model, "head",
                        {k: tr[k] for k in ("input_ids", "attention_mask")}, tr["labels"],
                        {k: va[k] for k in ("input_ids", "attention_mask")}, va["labels"],
                        kwargs=True)
    assert rel_err(value(model, tr, va, method="lli"), ref) < REL


def test_hf_bert_sequence_classification_lai_and_lli():
    model = tiny_bert_classifier(layers=1).double()
    tr, va = token_batch(4, 7, 40, 3, seed=5), token_batch(3, 10, 40, 3, seed=6)
    names = linear_conv_names(model)
    ref = brute.lai_pairwise(
        model, lambda: model(input_ids=tr["input_ids"], attention_mask=tr["attention_mask"]).logits,
        lambda: model(input_ids=va["input_ids"], attention_mask=va["attention_mask"]).logits,
        tr["labels"], va["labels"], names, tr["attention_mask"], va["attention_mask"])
    assert rel_err(value(model, tr, va, method="lai"), ref) < REL
    v_lli = value(model, tr, va, method="lli")
    ref_lli = brute.lai_pairwise(
        model, lambda: model(input_ids=tr["input_ids"], attention_mask=tr["attention_mask"]).logits,
        lambda: model(input_ids=va["input_ids"], attention_mask=va["attention_mask"]).logits,
        tr["labels"], va["labels"], ["classifier"])
    assert rel_err(v_lli, ref_lli) < REL


def test_layer_sets_and_output_layer_option():
    model, tr, va = mlp_case()
    # "code": first layer (raw input) + output layer
    ref = brute.lai_pairwise(model, lambda: model(tr[0]), lambda: model(va[0]), tr[1], va[1],
                             ["body.0", "head"])
    assert rel_err(value(model, tr, va, method="lai", layers="code"), ref) < REL
    # lli on a named layer: G is taken at that layer's output, so the value is exactly the
    # similarity of the per-sample gradients of its weight
    ref2 = lli_reference(model, "body.2", tr[0], tr[1], va[0], va[1])
    assert rel_err(value(model, tr, va, method="lli", output_layer="body.2"), ref2) < REL


def test_sign_helpful_sample_is_positive():
    """A training sample identical to the validation set is valuable, its label-flipped twin is not."""
    model, _, (xv, yv) = mlp_case()
    xt = torch.cat([xv[:1], xv[:1]])
    yt = torch.stack([yv[0], (yv[0] + 1) % 5])
    v = value(model, (xt, yt), (xv[:1], yv[:1]), method="lai")
    assert v[0] > 0 > v[1]


def test_unsupported_and_bad_inputs_fail_clearly():
    model, tr, va = mlp_case()
    with pytest.raises(TypeError, match="options"):  # static-only options on an online method
        value(model, tr, va, method="lai", damping=0.1)
    with pytest.raises(ValueError, match="unknown method 'nope'; this function takes: ghost, "
                                         "lai, lli, ghost_flat, datainf, ip, lissa, trak"):
        value(model, tr, va, method="nope")
    with pytest.raises(ValueError, match="training settings of run.py"):
        value(model, tr, va, method="vanilla")
    from lai import pairwise
    with pytest.raises(ValueError, match="this function takes: ghost, lai, lli$"):
        pairwise(model, tr, va, method="ip")
    # names are not case-sensitive
    assert torch.equal(value(model, tr, va, method="LAI"), value(model, tr, va, method="lai"))
    with pytest.raises(ValueError, match="labels"):
        value(model, {"x": tr[0]}, va)
    with pytest.raises(ValueError, match="output_layer"):
        value(model, tr, va, method="lli", output_layer="missing")


@pytest.mark.parametrize("cache", ["folded", "pairwise"])
def test_layers_fed_the_same_tensor_share_one_cache_entry(cache):
    """q, k and v read the same tensor: one phi_v / M for the three (values stay exact, see
    test_lai_transformer_with_padding); cache_bytes counts it once."""
    from lai.batching import as_batch
    from lai.estimators.online.lai import LAIEstimator

    model = PaddedTransformer()
    est = LAIEstimator(cache=cache)
    est.refresh(model, as_batch(token_batch(5, 12, 30, 3, seed=2)))
    store = est.M if cache == "folded" else est.phi_v
    assert store[("q", 0)] is store[("k", 0)] is store[("v", 0)]
    assert store[("q", 0)] is not store[("o", 0)]
    assert est.cache_bytes() == sum(t.numel() * t.element_size()
                                    for t in {id(t): t for t in store.values()}.values()) + (
        0 if cache == "folded" else est.g_v.numel() * est.g_v.element_size())
