"""LAI/LLI on sequence models: per-token output gradients with token pairing.

Definition tested (see lai/estimators/online/lai.py): with G_{x,t} = d ell_x / d s^(L)_{x,t} and
phi_l(x,t) the input of layer l at position t,

    v_j = sum_z sum_l sum_{s,t} <phi_l(z,s), phi_l(j,t)> <G_{z,s}, G_{j,t}>

for token layers, and the flattened pairing for the rest; LLI keeps l = L and then equals the
inner product of per-sample gradients of the output layer's weight.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import pairwise, value
from tests.estimators import brute
from tests.estimators.brute import rel_err, strip
from tests.estimators.nets import lm_batch, tiny_lm, token_batch

transformers = pytest.importorskip("transformers")
REL = 1e-6


def token_pairing_reference(model, tr, va, names):
    """Brute force: every (z, j, layer, s, t) term written out."""
    def run(batch):
        feats, out = brute.layer_inputs(model, lambda: model(**strip(batch)).logits, names)
        lab = batch["labels"]
        with torch.enable_grad():
            logits = out.detach().requires_grad_(True)
            per = torch.stack([nn.functional.cross_entropy(logits[i][lab[i] != -100],
                                                           lab[i][lab[i] != -100])
                               for i in range(len(lab))])
            (g,) = torch.autograd.grad(per.sum(), logits)
        m = batch["attention_mask"]
        # a layer fed the hidden states flattened to [B * T, D] (OPT's fc1/fc2): per sample
        feats = {n: f.view(*m.shape, -1) if f.dim() == 2 and f.shape[0] == m.numel() else f
                 for n, f in feats.items()}
        return {n: f * m[:, :, None] for n, f in feats.items()}, g

    with torch.no_grad():
        ft, gt = run(tr)
        fv, gv = run(va)
    v = torch.zeros(len(tr["labels"]))
    for j in range(len(v)):
        for z in range(len(va["labels"])):
            for n in names:
                alpha = ft[n][j] @ fv[n][z].T      # [T, S]
                beta = gt[j] @ gv[z].T             # [T, S]
                v[j] += (alpha * beta).sum()
    return v


def test_lli_causal_lm_equals_per_sample_lm_head_gradients():
    model = tiny_lm()
    tr, va = lm_batch(4, 8, 40, 1), lm_batch(3, 10, 40, 2)  # different padded lengths
    gt = brute.per_sample_grads(model, ["lm_head.weight"], strip(tr), tr["labels"], True)
    gv = brute.per_sample_grads(model, ["lm_head.weight"], strip(va), va["labels"], True)
    ref = gt @ gv.sum(0)
    for cache in ("folded", "pairwise"):
        assert rel_err(value(model, tr, va, lm_labels="aligned", method="lli", cache=cache), ref) < REL
    assert rel_err(pairwise(model, tr, va, lm_labels="aligned", method="lli"), gt @ gv.T) < REL


def test_lai_causal_lm_token_pairing_brute_force():
    model = tiny_lm()
    tr, va = lm_batch(3, 7, 40, 3), lm_batch(3, 7, 40, 4)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ref = token_pairing_reference(model, tr, va, names)
    for cache in ("folded", "pairwise"):
        assert rel_err(value(model, tr, va, lm_labels="aligned", method="lai", cache=cache), ref) < REL


def test_self_influence_lm_is_symmetric_pairwise():
    model = tiny_lm()
    b = lm_batch(4, 8, 40, 5)
    p = pairwise(model, b, b, lm_labels="aligned", method="lai")
    assert torch.allclose(p, p.T, atol=1e-12)
    assert (torch.diagonal(p) >= 0).all()  # each sample agrees with itself


def test_gpt_neo_sequence_classification_lli_exact():
    """The head scores every position and the model reads the last real token's logits:
    G is taken at the head's output, so LLI equals the per-sample score.weight gradients."""
    cfg = transformers.GPTNeoConfig(vocab_size=40, hidden_size=8, num_layers=1, num_heads=2,
                                    attention_types=[[["global"], 1]], max_position_embeddings=32,
                                    intermediate_size=16, num_labels=3, pad_token_id=0,
                                    attn_implementation="eager", bos_token_id=None,
                                    eos_token_id=None)
    model = transformers.GPTNeoForSequenceClassification(cfg).eval()
    tr, va = token_batch(4, 8, 40, 3, 6), token_batch(3, 8, 40, 3, 7)
    gt = brute.per_sample_grads(model, ["score.weight"], strip(tr), tr["labels"], True)
    gv = brute.per_sample_grads(model, ["score.weight"], strip(va), va["labels"], True)
    for cache in ("folded", "pairwise"):
        assert rel_err(value(model, tr, va, lm_labels="aligned", method="lli", cache=cache), gt @ gv.sum(0)) < REL
    # LAI: folded and pairwise agree, and the values are finite and not all zero
    a = value(model, tr, va, lm_labels="aligned", method="lai", cache="folded")
    b = value(model, tr, va, lm_labels="aligned", method="lai", cache="pairwise")
    assert rel_err(a, b) < REL and a.abs().sum() > 0


def _held_tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj.__dict__`` (dicts, lists,
    tuples followed): what the estimator keeps alive between refreshes."""
    seen, stack = {}, [vars(obj)]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return sum(seen.values())


@pytest.mark.parametrize("method", ["lai", "lli"])
@pytest.mark.parametrize("cache", ["folded", "pairwise"])
def test_lm_cache_holds_only_what_its_form_reads(cache, method):
    """The folded form reads only M (the validation output gradients are folded into it), so
    it must not also keep ``g_v [|V|, T, vocab]``, the largest tensor of an LM's cache; what the
    estimator holds is exactly ``cache_bytes()``, and values are unchanged."""
    from lai.batching import as_batch
    from lai.estimators.online.lai import LAIEstimator

    model = tiny_lm()
    tr, va = lm_batch(4, 8, 40, 1), lm_batch(3, 10, 40, 2)
    est = LAIEstimator(layers="lli" if method == "lli" else "all", cache=cache)
    est.refresh(model, as_batch(va))
    assert (est.g_v is None) == (cache == "folded")
    assert _held_tensor_bytes(est) == est.cache_bytes() > 0
    other = value(model, tr, va, lm_labels="aligned", method=method,
                  cache="pairwise" if cache == "folded" else "folded")
    with est.capture(model, as_batch(tr)) as cap:
        model(**strip(tr))
    assert rel_err(est.score(cap), other) < REL


def test_lm_output_layer_term_from_the_gradient_side():
    """LLI's folded term on an LM (K = vocabulary > d) is contracted after the forward as
    sum_t <M^T G_{j,t}, phi(j,t)> instead of through a [B, T, vocab] accumulator: the same
    values as the accumulator path and as brute force, and a lower peak of live tensors."""
    from lai.batching import as_batch
    from lai.estimators.online.lai import LAIEstimator
    from lai.bench.memory import PeakTensorMemory

    cfg = transformers.GPTNeoConfig(vocab_size=400, hidden_size=8, num_layers=1, num_heads=2,
                                    attention_types=[[["global"], 1]], max_position_embeddings=32,
                                    intermediate_size=16, attn_implementation="eager",
                                    bos_token_id=None, eos_token_id=None,
                                    tie_word_embeddings=False)
    model = transformers.GPTNeoForCausalLM(cfg).eval()
    tr, va = lm_batch(6, 12, 400, 1), lm_batch(3, 10, 400, 2)
    gt = brute.per_sample_grads(model, ["lm_head.weight"], strip(tr), tr["labels"], True)
    gv = brute.per_sample_grads(model, ["lm_head.weight"], strip(va), va["labels"], True)
    ref = gt @ gv.sum(0)
    est = LAIEstimator(layers="lli", cache="folded")
    est.refresh(model, as_batch(va))
    assert est._defer_tokens  # 400 > 8
    out, peaks = {}, {}
    for defer in (True, False):
        est._defer_tokens = defer
        with PeakTensorMemory() as mem:
            with est.capture(model, as_batch(tr)) as cap:
                model(**strip(tr))
            out[defer] = est.score(cap)
            del cap
        peaks[defer] = mem.peak_mib
    assert rel_err(out[True], ref) < REL and rel_err(out[False], ref) < REL
    assert peaks[True] < peaks[False]


@pytest.mark.parametrize("layers", ["all", "lli"])
def test_a_capture_is_freed_without_the_garbage_collector(layers):
    """The tap's callback closes over the capture that holds the tap; the tap drops it on
    exit, so a step's accumulators (an LM's [B, T, K] buffers) go with the capture by
    reference counting, not at the collector's next pass into the next step."""
    import gc
    import weakref

    from lai.batching import as_batch
    from lai.estimators.online.lai import LAIEstimator

    model = tiny_lm()
    tr, va = as_batch(lm_batch(4, 8, 40, 1)), as_batch(lm_batch(3, 8, 40, 2))
    est = LAIEstimator(layers=layers, cache="folded")
    gc.disable()
    try:
        with torch.no_grad():
            est.refresh(model, va)
            with est.capture(model, tr) as cap:
                model(**strip(lm_batch(4, 8, 40, 1)))
            est.score(cap)
        held = [weakref.ref(t) for t in (cap.acc_tok, cap.acc_flat, cap.tap.logits)
                if t is not None] + [weakref.ref(d[0]) for d in cap.deferred]
        assert held
        del cap
        assert all(r() is None for r in held)
    finally:
        gc.enable()


def test_scoring_an_lm_never_holds_a_whole_vocabulary_sized_gradient():
    """LAI's folded token accumulator ``[B, T, K]`` meets the output gradient G (the same
    shape): ``score`` takes G for a block of rows at a time and each row's inner product in
    blocks of columns, so what it adds at its peak is less than one ``[B, T, K]`` tensor (a
    ``(G * acc).sum`` over the whole batch held two, and was the peak of a LAI step on a
    language model). The values are brute force's, with any number of row blocks."""
    from lai.batching import as_batch
    from lai.estimators.online.lai import LAIEstimator
    from lai.bench.memory import PeakTensorMemory

    vocab, b, t = 2500, 4, 8  # B T K = 80,000 elements: above row_dot's single-block size
    model = tiny_lm(vocab)
    tr, va = lm_batch(b, t, vocab, 1), lm_batch(3, 10, vocab, 2)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ref = token_pairing_reference(model, tr, va, names)
    est = LAIEstimator(layers="all", cache="folded")
    est.refresh(model, as_batch(va))
    est._defer_tokens = False  # the accumulator path (the gradient side is tested above)
    for blocks in (4, 1):
        est.score_blocks = blocks
        with torch.no_grad():
            with est.capture(model, as_batch(tr)) as cap:
                model(**strip(tr))
            assert cap.acc_tok is not None and cap.acc_tok.shape == (b, t, vocab)
            with PeakTensorMemory() as mem:
                got = est.score(cap)
        assert rel_err(got, ref) < REL, blocks
        if blocks == 4:
            one = cap.acc_tok.numel() * cap.acc_tok.element_size()  # one [B, T, K] tensor
            assert mem.peak_bytes - mem.start_bytes < one


def tiny_opt(vocab: int = 40) -> nn.Module:
    """A random-init HF ``OPTForCausalLM``: its decoder layers run ``fc1``/``fc2`` (and their
    LayerNorm) on the hidden states flattened to ``[B * T, D]``."""
    cfg = transformers.OPTConfig(vocab_size=vocab, hidden_size=8, ffn_dim=16,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=32, word_embed_proj_dim=8,
                                 bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return transformers.OPTForCausalLM(cfg).eval()


def test_lai_on_layers_fed_flattened_token_rows_opt():
    """OPT's fc1/fc2 see ``[B * T, D]``: their rows are taken batch-major as each sample's
    tokens (token pairing, padding masked), against the brute force with the same reading."""
    model = tiny_opt()
    tr, va = lm_batch(3, 7, 40, 3), lm_batch(3, 7, 40, 4)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert any(n.endswith("fc1") for n in names)
    ref = token_pairing_reference(model, tr, va, names)
    for cache in ("folded", "pairwise"):
        assert rel_err(value(model, tr, va, lm_labels="aligned", method="lai", cache=cache), ref) < REL


def test_layer_rows_that_are_not_per_sample_fail_clearly():
    """A layer whose input's rows are not the batch's (here two views of each sample stacked
    as [2B, D]) cannot be attributed: a ValueError naming it, not a shape error later."""
    class TwoViews(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = self.enc(torch.cat([x, x.flip(1)]))  # [2B, 5]
            return self.head(h[: len(x)] + h[len(x):])

    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="'enc'.*8 rows for a batch of 4"):
        value(TwoViews(), (x, y), (x, y), method="lai")
    assert value(TwoViews(), (x, y), (x, y), method="lai", layers=["head"]).shape == (4,)
