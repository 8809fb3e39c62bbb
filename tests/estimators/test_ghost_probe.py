"""Ghost's probe form (values from the training backward) beyond the models of
test_ghost_exact.py (which checks both forms on MLP, CNN, BERT, GPT-Neo, GPT-2): norms and
frozen weights, train-mode dropout and BatchNorm, when it applies, the sum-rule check, live
memory. The trainer running it: tests/train/test_ghost_score_only.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lai import value
from lai.batching import as_batch
from lai.estimators.online.ghost import GhostEstimator
from tests.estimators import brute
from tests.estimators.brute import rel_err
from tests.estimators.nets import CNN, MLP, PaddedTransformer, tiny_bert_classifier, token_batch

REL = 1e-6


def probe(model, tr, va) -> torch.Tensor:
    est = GhostEstimator(mode="probe")
    est.refresh(model, as_batch(va))
    return est.probe_values(model, as_batch(tr))


def check_against_brute_force(model, tr, va) -> None:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gt = brute.per_sample_grads(model, names, tr[0], tr[1])
    gv = brute.per_sample_grads(model, names, va[0], va[1])
    v = probe(model, tr, va)
    assert rel_err(v, gt @ gv.sum(0)) < REL
    assert rel_err(v, value(model, tr, va, lm_labels="aligned", method="ghost")) < REL  # = the forward-mode form


def test_frozen_parameters_and_group_and_rms_norm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.gn = nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4, 6)
            self.rms = nn.RMSNorm(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.gn(self.c(x))).mean(dim=(2, 3))
            return self.head(self.rms(torch.tanh(self.fc(h))))

    model = Net()
    model.c.weight.requires_grad_(False)  # a module whose bias alone trains
    model.fc.bias.requires_grad_(False)
    check_against_brute_force(model, (torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))),
                              (torch.randn(3, 3, 6, 6), torch.randint(0, 3, (3,))))


def test_train_mode_dropout_equals_forward_mode():
    """Dropout draws per element, so samples stay independent: same values as forward mode
    under the same random masks."""
    model = tiny_bert_classifier(layers=2).train()  # dropout 0.1 on hidden and attention
    tr, va = as_batch(token_batch(5, 8, 40, 3, 11)), as_batch(token_batch(3, 8, 40, 3, 12))
    est_p, est_f = GhostEstimator(mode="probe"), GhostEstimator(mode="forward")
    torch.manual_seed(1)
    est_p.refresh(model, va)
    torch.manual_seed(1)
    est_f.refresh(model, va)
    torch.manual_seed(2)
    v_probe = est_p.probe_values(model, tr)
    torch.manual_seed(2)
    with torch.no_grad(), est_f.capture(model, tr) as cap:
        from lai.batching import forward_logits
        forward_logits(model, tr.inputs)
    v_forward = est_f.score(cap)
    assert rel_err(v_probe, v_forward) < REL


def test_plan_picks_the_form():
    est = GhostEstimator()  # auto
    assert est.plan(MLP(), values_before_backward=False) == "probe"
    assert est.scores_after_backward
    assert est.plan(MLP(), values_before_backward=True) == "forward"  # a filtering policy
    assert est.plan(CNN().train(), values_before_backward=False) == "forward"  # batch stats
    assert est.plan(CNN().eval(), values_before_backward=False) == "probe"
    assert est.plan(PaddedTransformer(), values_before_backward=False) == "forward"  # free pos
    assert GhostEstimator(mode="forward").plan(MLP(), False) == "forward"
    with pytest.raises(ValueError, match="a policy that keeps every sample"):
        GhostEstimator(mode="probe").plan(MLP(), values_before_backward=True)
    with pytest.raises(ValueError, match="PaddedTransformer"):
        GhostEstimator(mode="probe").plan(PaddedTransformer(), values_before_backward=False)
    with pytest.raises(ValueError, match="ghost mode"):
        GhostEstimator(mode="fast")


def test_batchnorm_train_mode_probe_is_the_per_route_split_with_the_same_sum():
    """With batch statistics the probe form splits <g_V, grad sum_j ell_j> by route: the
    batch total is the forward-mode total, the per-sample values are not (why auto avoids
    it)."""
    model = CNN().train()
    tr = (torch.randn(6, 3, 10, 10), torch.randint(0, 4, (6,)))
    va = (torch.randn(3, 3, 10, 10), torch.randint(0, 4, (3,)))
    v_probe = probe(model, tr, va)
    v_forward = value(model, tr, va, lm_labels="aligned", method="ghost")
    assert rel_err(v_probe.sum(), v_forward.sum()) < REL
    assert rel_err(v_probe, v_forward) > 1e-3


def test_a_weight_used_outside_its_module_is_caught_by_the_sum_rule():
    class TiedByHand(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.mix = nn.Linear(6, 6)

        def forward(self, ids):  # the embedding matrix read directly: no hook sees this use
            return torch.tanh(self.mix(self.emb(ids).mean(1))) @ self.emb.weight[:4].T

    ids, ids_v = torch.randint(0, 20, (5, 7)), torch.randint(0, 20, (3, 7))
    train, val = (ids, torch.randint(0, 4, (5,))), (ids_v, torch.randint(0, 4, (3,)))
    # mode=probe: tried on validation rows at the first refresh, refused before any step
    with pytest.raises(ValueError, match="does not fit this model.*outside the forward"):
        probe(TiedByHand(), train, val)
    # auto: the plan (module types) says probe; the trial says no; the forward form it is
    model = TiedByHand()
    est = GhostEstimator(mode="auto")
    assert est.plan(model, values_before_backward=False) == "probe"
    with pytest.warns(UserWarning, match="probe form does not fit"):
        est.refresh(model, as_batch(val))
    assert est.active_mode == "forward" and not est.scores_after_backward
    from lai.batching import forward_logits

    with torch.no_grad(), est.capture(model, as_batch(train)) as cap:
        forward_logits(model, as_batch(train).inputs)
    assert rel_err(est.score(cap), value(model, train, val, method="ghost")) < REL
    est.refresh(model, as_batch(val))  # tried once: no second warning, still forward
    assert est.active_mode == "forward"


def test_steps_do_not_keep_their_graphs_alive():
    """The gradient hooks hold the capture; a capture holding the graph would close a cycle
    through C++ that gc cannot break, keeping every step's layer inputs: live memory must
    not grow from step to step."""
    import gc

    from lai.batching import forward_logits, per_sample_loss
    from lai.bench.memory import PeakTensorMemory

    model = MLP(d_in=64, hidden=256)
    est = GhostEstimator(mode="probe")
    est.refresh(model, as_batch((torch.randn(4, 64), torch.randint(0, 5, (4,)))))
    batch = as_batch((torch.randn(32, 64), torch.randint(0, 5, (32,))))
    starts = []
    for _ in range(3):
        gc.collect()
        with PeakTensorMemory(device="cpu") as mem:
            with est.capture(model, batch) as cap:
                logits = forward_logits(model, batch.inputs)
            model.zero_grad(set_to_none=True)
            per_sample_loss(logits, batch.labels).sum().backward()
            est.score(cap)
            del cap, logits
        starts.append(mem.start_bytes)
    assert starts[1] == starts[2]


def test_torchvision_resnet18_in_place_relu_after_batchnorm_eval():
    """The hook on a BatchNorm output sees the gradient of that output even though the
    following ReLU(inplace=True) overwrites it: same values as forward mode."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=5)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # running statistics
    model.eval()
    tr = (torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))
    va = (torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,)))
    assert rel_err(probe(model, tr, va), value(model, tr, va, lm_labels="aligned", method="ghost")) < REL


class GatedScale(nn.Module):
    """A leaf module whose output is *not* linear in its parameters:
    ``scale * x * sigmoid(gate) + shift ** 2 (+ offset)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(dim))
        self.shift = nn.Parameter(torch.randn(dim))

    def forward(self, x, scale=1.0, offset=None):
        out = scale * x * torch.sigmoid(self.gate) + self.shift ** 2
        return out if offset is None else out + offset  # (an addition saves no operand)


class GatedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.gated, self.fc2 = nn.Linear(6, 8), GatedScale(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.gated(self.fc1(x), scale=0.5)))


def test_replay_probe_on_a_module_nonlinear_in_its_parameters():
    """A leaf module without a closed-form probe gets the replay probe (its own forward in
    forward mode, keyword arguments included): exact against torch.func, though the module
    is not linear in its parameters; a module with submodules still has none."""
    from lai.estimators.online import ghost_probe

    model = GatedMLP()
    assert ghost_probe.probe_for(model.gated) is ghost_probe.module_jvp
    assert ghost_probe.probe_for(model) is None  # the root has children (and no parameters)
    tr = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    va = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    check_against_brute_force(model, tr, va)
    # auto takes the probe form for scoring without filtering
    assert GhostEstimator().plan(model, values_before_backward=False) == "probe"


def test_replay_probe_on_hugging_face_rms_norm():
    """Llama's ``LlamaRMSNorm`` (not ``nn.RMSNorm``): the replay probe, so the whole model has
    the probe form (the forward form is checked in
    test_ghost_exact.py): against torch.func to Llama's float32 rotary tables (about 1e-7
    here, as the forward form)."""
    transformers = pytest.importorskip("transformers")
    from lai.estimators.online import ghost_probe
    from tests.estimators.nets import lm_batch

    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    assert ghost_probe.probe_plan(model)[1] == []
    assert ghost_probe.probe_for(model.model.norm) is ghost_probe.module_jvp
    tr, va = lm_batch(4, 8, 40, 5), lm_batch(3, 8, 40, 6)
    names = [n for n, p in model.named_parameters()]
    strip = brute.strip
    ref = (brute.per_sample_grads(model, names, strip(tr), tr["labels"], kwargs=True)
           @ brute.per_sample_grads(model, names, strip(va), va["labels"], kwargs=True).sum(0))
    assert rel_err(probe(model, tr, va), ref) < 1e-6


def test_replay_probe_refuses_an_input_changed_in_place():
    """The replay needs the module's inputs as they were: one changed in place after the
    forward (autograd does not save it here) is a clear error, and auto falls back."""
    class ChangesItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.gated, self.fc2 = nn.Linear(6, 8), GatedScale(8), nn.Linear(8, 3)

        def forward(self, x):
            offset = torch.ones(1)
            h = self.gated(self.fc1(x), offset=offset)
            offset.mul_(3.0)  # the tensor the gated layer was called with, changed afterwards
            return self.fc2(h)

    tr = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    va = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="changed in place"):
        probe(ChangesItsInput(), tr, va)
    est = GhostEstimator(mode="auto")
    model = ChangesItsInput()
    assert est.plan(model, values_before_backward=False) == "probe"
    with pytest.warns(UserWarning, match="probe form does not fit"):
        est.refresh(model, as_batch(va))
    assert est.active_mode == "forward"


def test_replay_probe_refuses_a_module_with_randomness():
    """A leaf module that draws random numbers in its forward (dropout by hand, in train
    mode) replays to another output: the check on the first step (here, the trial on
    validation rows) names it, and auto falls back to the forward form."""
    class NoisyGate(GatedScale):
        def forward(self, x, scale=1.0, offset=None):
            return nn.functional.dropout(super().forward(x), 0.5, self.training)

    model = GatedMLP().train()
    model.gated = NoisyGate(8)
    va = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="NoisyGate.*another output"):
        probe(model, (torch.randn(5, 6), torch.randint(0, 3, (5,))), va)
    est = GhostEstimator(mode="auto")
    assert est.plan(model, values_before_backward=False) == "probe"
    with pytest.warns(UserWarning, match="another output"):
        est.refresh(model, as_batch(va))
    assert est.active_mode == "forward"
    model.eval()  # no random numbers: the replay probe applies
    tr = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    assert rel_err(probe(model, tr, va), value(model, tr, va, lm_labels="aligned", method="ghost")) < REL


def test_replay_probe_refuses_a_module_that_mixes_the_samples():
    """A hand-written batch norm (not a ``_BatchNorm``, so the plan cannot see it): the
    replay probe would give the per-route split; the first step's check replays one sample
    alone, sees another output, and names it; auto falls back to the forward form."""
    class HandBatchNorm(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x, scale=1.0):  # GatedMLP passes scale
            x = scale * x
            return self.weight * (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()

    model = GatedMLP()
    model.gated = HandBatchNorm(8)
    tr = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    va = (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="HandBatchNorm.*mixes the samples"):
        probe(model, tr, va)
    est = GhostEstimator(mode="auto")
    assert est.plan(model, values_before_backward=False) == "probe"
    with pytest.warns(UserWarning, match="mixes the samples"):
        est.refresh(model, as_batch(va))
    assert est.active_mode == "forward"
