"""Ghost values, in both forms, against torch.func per-sample gradients (all trainable
parameters), float64."""
from __future__ import annotations

import pytest
import torch

from lai import pairwise, value
from tests.estimators import brute
from tests.estimators.brute import rel_err, strip
from tests.estimators.nets import (CNN, MLP, PaddedTransformer, lm_batch, tiny_bert_classifier,
                                   token_batch)

REL = 1e-6


def reference(model, tr_in, tr_y, va_in, va_y, kwargs=False):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gt = brute.per_sample_grads(model, names, tr_in, tr_y, kwargs)
    gv = brute.per_sample_grads(model, names, va_in, va_y, kwargs)
    return gt @ gv.sum(0), gt @ gv.T


def probe_form(model, tr, va) -> torch.Tensor:
    """Ghost's probe form (values from its own backward; lai/estimators/online/ghost_probe.py)."""
    from lai.batching import as_batch
    from lai.estimators.online.ghost import GhostEstimator

    est = GhostEstimator(mode="probe")
    est.refresh(model, as_batch(va))
    return est.probe_values(model, as_batch(tr))


def check(model, tr, va, kwargs, probe=True):
    """Forward-mode values and pairs, and (``probe``) the probe form's values, against
    torch.func; the model's parameters, buffers and ``.grad`` left as they were."""
    if kwargs:
        ref, ref_pairs = reference(model, strip(tr), tr["labels"], strip(va), va["labels"], True)
    else:
        ref, ref_pairs = reference(model, tr[0], tr[1], va[0], va[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    v = value(model, tr, va, lm_labels="aligned", method="ghost")
    assert rel_err(v, ref) < REL
    pairs = pairwise(model, tr, va, lm_labels="aligned", method="ghost")
    assert pairs.shape == ref_pairs.shape and rel_err(pairs, ref_pairs) < REL
    assert rel_err(pairs.sum(1), v) < REL
    if probe:
        assert rel_err(probe_form(model, tr, va), ref) < REL
        assert all(p.grad is None for p in model.parameters())
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_mlp():
    check(MLP(), (torch.randn(7, 12), torch.randint(0, 5, (7,))),
          (torch.randn(4, 12), torch.randint(0, 5, (4,))), False)


def test_cnn_strided_dilated_grouped_batchnorm_eval():
    model = CNN()
    model.train()
    model(torch.randn(16, 3, 10, 10))  # non-trivial running statistics
    model.eval()
    check(model, (torch.randn(6, 3, 10, 10), torch.randint(0, 4, (6,))),
          (torch.randn(3, 3, 10, 10), torch.randint(0, 4, (3,))), False)


def test_transformer_with_padding_embedding_layernorm_free_parameter():
    model = PaddedTransformer().eval()  # its free positional parameter has no probe
    check(model, token_batch(5, 9, 30, 3, 1), token_batch(3, 9, 30, 3, 2), True, probe=False)


def test_bert_tiny_sequence_classification():
    model = tiny_bert_classifier(layers=2)
    check(model, token_batch(4, 8, 40, 3, 3), token_batch(3, 8, 40, 3, 4), True)


def test_gpt_neo_tiny_causal_lm():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoConfig(vocab_size=40, hidden_size=8, num_layers=2, num_heads=2,
                                    attention_types=[[["global", "local"], 1]],
                                    max_position_embeddings=32, intermediate_size=16,
                                    window_size=4, attn_implementation="eager",
                                    bos_token_id=None, eos_token_id=None)
    model = transformers.GPTNeoForCausalLM(cfg).eval()  # lm_head is tied to the embedding
    check(model, lm_batch(4, 8, 40, 5), lm_batch(3, 8, 40, 6), True)


def test_hf_conv1d_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=1, n_head=2, n_positions=32,
                                  num_labels=3, pad_token_id=0, attn_implementation="eager")
    model = transformers.GPT2ForSequenceClassification(cfg).eval()
    check(model, token_batch(4, 8, 40, 3, 7), token_batch(3, 8, 40, 3, 8), True)


@pytest.mark.parametrize("arch", ["bert_classifier", "gpt2_lm", "llama_lm_gqa"])
def test_hf_models_with_sdpa_attention(arch):
    """Hugging Face's default attention (``attn_implementation="sdpa"``): the fused kernels
    have no forward-mode formula, so Ghost's forward form (and ``pairwise``) run attention
    by PyTorch's math backend (forward_fastpaths._attention_math); values against torch.func,
    padding included. Llama's rotary tables are float32 whatever the model's dtype, hence its
    looser tolerance (the eager model is as far from torch.func)."""
    transformers = pytest.importorskip("transformers")
    if arch == "bert_classifier":
        cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=16,
                                      max_position_embeddings=32, num_labels=3,
                                      attn_implementation="sdpa")
        model = transformers.BertForSequenceClassification(cfg)
        tr, va = token_batch(4, 8, 40, 3, 3), token_batch(3, 8, 40, 3, 4)
    elif arch == "gpt2_lm":
        cfg = transformers.GPT2Config(vocab_size=40, n_embd=8, n_layer=2, n_head=2,
                                      n_positions=32, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(cfg)
        tr, va = lm_batch(4, 8, 40, 5), lm_batch(3, 8, 40, 6)
    else:
        cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, max_position_embeddings=32,
                                       attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(cfg)
        tr, va = lm_batch(4, 8, 40, 5), lm_batch(3, 8, 40, 6)
    model = model.double().eval()
    assert model.config._attn_implementation == "sdpa"
    ref, ref_pairs = reference(model, strip(tr), tr["labels"], strip(va), va["labels"], True)
    tol = 1e-6 if arch == "llama_lm_gqa" else REL
    from lai.batching import as_batch, forward_logits
    from lai.estimators.online.ghost import GhostEstimator
    out = {}
    for fast in (True, False):
        est = GhostEstimator(mode="forward", forward_fastpaths=fast)
        with torch.no_grad():
            est.refresh(model, as_batch(va))
            with est.capture(model, as_batch(tr)) as cap:
                forward_logits(model, as_batch(tr).inputs)
        out[fast] = est.score(cap)
        assert rel_err(out[fast], ref) < tol, fast
    assert rel_err(out[True], out[False]) < 1e-12
    pairs = pairwise(model, tr, va, lm_labels="aligned", method="ghost")
    assert rel_err(pairs, ref_pairs) < tol


def test_opt_flattened_rows_and_an_overridden_forward():
    """OPT: fc1/fc2 and their LayerNorm run on ``[B * T, D]`` rows (the probe sums each
    sample's T rows), and its position embedding subclasses ``nn.Embedding`` with a forward
    of its own (the attention mask in, an offset added): the closed-form embedding probe
    would compute something else, so it gets the replay probe (its own forward in forward
    mode on the arguments it was called with), exact in both forms."""
    transformers = pytest.importorskip("transformers")
    from lai.estimators.online import ghost_probe

    cfg = transformers.OPTConfig(vocab_size=40, hidden_size=8, ffn_dim=16, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=32,
                                 word_embed_proj_dim=8, bos_token_id=None, eos_token_id=None,
                                 pad_token_id=0)
    model = transformers.OPTForCausalLM(cfg).double().eval()
    positions = model.model.decoder.embed_positions
    assert ghost_probe.probe_for(positions) is ghost_probe.module_jvp
    assert ghost_probe.probe_for(model.model.decoder.embed_tokens) is ghost_probe._embedding
    assert ghost_probe.probe_plan(model)[1] == []
    check(model, lm_batch(4, 8, 40, 5), lm_batch(3, 8, 40, 6), True, probe=True)


def test_torch_multihead_attention_without_weights():
    """``nn.TransformerEncoder`` (``nn.MultiheadAttention`` called with ``need_weights=False``,
    as torchvision's ViT calls it): its fused attention runs outside the fast paths' sight,
    so the forward form asks for the weights (the explicit path) and drops them."""
    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(5, 8)
            layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(1))

    g = torch.Generator().manual_seed(0)
    model = Encoder().double().eval()
    check(model, (torch.randn(5, 6, 5, generator=g, dtype=torch.float64),
                  torch.randint(0, 3, (5,), generator=g)),
          (torch.randn(3, 6, 5, generator=g, dtype=torch.float64),
           torch.randint(0, 3, (3,), generator=g)), False, probe=False)


def test_tied_embedding_with_padding_index_used_as_a_token():
    """An embedding with ``padding_idx`` tied to the output layer, the padding id read at
    positions that count: PyTorch's gradient leaves the lookup of the padding row out (its
    forward-mode formula would not), so Ghost's forward form and probe form must too."""
    class TiedBag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(12, 6, padding_idx=0)
            self.head = torch.nn.Linear(6, 12, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids).mean(1)))

    g = torch.Generator().manual_seed(0)
    model = TiedBag().double()
    ids, ids_v = torch.randint(0, 12, (6, 5), generator=g), torch.randint(0, 12, (4, 5), generator=g)
    ids[:, 0], ids_v[:, 0] = 0, 0  # the padding id in every sample
    check(model, (ids, torch.randint(0, 12, (6,), generator=g)),
          (ids_v, torch.randint(0, 12, (4,), generator=g)), False)


def test_one_pass_training_forward_keeps_its_backward():
    """The dual forward's primal output still back-propagates to the real parameters."""
    from lai.batching import as_batch, forward_logits, per_sample_loss
    from lai.estimators.online.ghost import GhostEstimator

    model = MLP()
    tr = as_batch((torch.randn(5, 12), torch.randint(0, 5, (5,))))
    va = as_batch((torch.randn(3, 12), torch.randint(0, 5, (3,))))
    est = GhostEstimator()
    est.refresh(model, va)
    with est.capture(model, tr) as cap:
        logits = forward_logits(model, tr.inputs)
    per_sample_loss(logits, tr.labels).sum().backward()
    ref = torch.autograd.grad(per_sample_loss(model(tr.inputs), tr.labels).sum(),
                              list(model.parameters()))
    for p, g in zip(model.parameters(), ref):
        assert torch.allclose(p.grad, g)
    assert rel_err(est.score(cap), value(model, tr, va, lm_labels="aligned", method="ghost")) < REL


def test_operation_without_forward_ad_gives_a_clear_error():
    """A custom Function with neither a jvp nor a differentiable backward (from which
    custom_function_jvp.py derives one) cannot be pushed a tangent through: a clear error."""
    from torch.autograd.function import once_differentiable

    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        @once_differentiable
        def backward(ctx, g):
            return g * 2

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return NoForwardAD.apply(self.fc(x))

    with pytest.raises(NotImplementedError, match="forward-mode AD.*NoForwardAD.*jvp"):
        value(Net(), (torch.randn(3, 4), torch.tensor([0, 1, 2])),
              (torch.randn(2, 4), torch.tensor([0, 1])), method="ghost")


@pytest.mark.parametrize("method", ["ghost", "lai"])
def test_validation_chunks_give_the_same_cache(method):
    """A validation set refreshed in chunks (here of 2 rows) gives the values of one chunk."""
    from lai.batching import as_batch
    from lai.estimators.registry import build_estimator

    model = CNN().eval()
    tr = as_batch((torch.randn(5, 3, 10, 10), torch.randint(0, 4, (5,))))
    va = as_batch((torch.randn(5, 3, 10, 10), torch.randint(0, 4, (5,))))
    out = []
    for chunk in (512, 2):
        est = build_estimator(method, chunk_size=chunk)
        est.refresh(model, va)
        with est.capture(model, tr) as cap:
            model(tr.inputs)
        out.append(est.score(cap))
    assert rel_err(out[1], out[0]) < 1e-12


@pytest.mark.parametrize("method", ["ghost", "lai"])
def test_no_grad_scoring_forward_gives_the_training_forward_values(method):
    """two_pass scores under no_grad (nothing kept for a backward: Ghost's low-memory form);
    the values are those of the grad-mode training forward, BatchNorm in train mode too."""
    from lai.batching import as_batch
    from lai.estimators.capture import preserved_buffers
    from lai.estimators.registry import build_estimator

    model = CNN().train()
    tr = as_batch((torch.randn(6, 3, 10, 10), torch.randint(0, 4, (6,))))
    va = as_batch((torch.randn(4, 3, 10, 10), torch.randint(0, 4, (4,))))
    est = build_estimator(method)
    est.refresh(model, va)
    with preserved_buffers(model):
        with est.capture(model, tr) as cap:
            model(tr.inputs)
        v_grad = est.score(cap)
    with torch.no_grad(), preserved_buffers(model):
        with est.capture(model, tr) as cap:
            model(tr.inputs)
        v_nograd = est.score(cap)
    assert rel_err(v_nograd, v_grad) < 1e-12
