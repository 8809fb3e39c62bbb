"""Speed options of the trainer (bf16 autocast, channels-last, compile, log_every) and the
host syncs of a step, on CPU."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lai.train.loop as loop_mod

from lai import value
from lai.config import TrainerConfig
from lai.data.base import DataBundle, TensorSplit
from lai.data.vision import CifarPreprocess
from lai.estimators.registry import build_estimator, estimator_options
from lai.models.small import SmallCNN
from lai.policies import build_policy
from lai.train import loop as loop_mod
from lai.train.loop import Trainer
from lai.train.runner import run_experiment
from lai.bench.syncs import DeviceWork
from tests.conftest import compose_cfg
from tests.estimators.nets import CNN


class _NullRecorder:
    context: dict = {}

    def log(self, *a, **k) -> None:
        pass


def cifar_trainer(est: str, policy: str, strategy: str = "one_pass", **tcfg) -> Trainer:
    """A Trainer on random CIFAR-shaped uint8 images (16x16), a small CNN, ready to step."""
    g = torch.Generator().manual_seed(0)
    n = 64
    x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    xv = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    data = DataBundle("synthetic", "classification", 4,
                      TensorSplit(x, torch.randint(0, 4, (n,), generator=g)),
                      TensorSplit(xv, torch.randint(0, 4, (16,), generator=g)),
                      TensorSplit(xv[:8], torch.randint(0, 4, (8,), generator=g)),
                      preprocess=CifarPreprocess((0.5,) * 3, (0.25,) * 3, True))
    torch.manual_seed(0)
    pol = (build_policy("threshold", threshold=float(policy.split("=")[1]))
           if policy.startswith("threshold=") else build_policy(policy))
    tr = Trainer(SmallCNN(4, width=4), data, build_estimator(est), pol,
                 TrainerConfig(batch_size=16, optimizer="sgd", lr=1e-2, progress=False,
                               strategy=strategy, **tcfg),
                 estimator_options(est, val_fraction=1.0), torch.device("cpu"),
                 _NullRecorder())
    tr.setup(100)
    return tr


def _syncs_of_a_step(tr: Trainer) -> dict:
    if tr.scoring:
        tr._refresh()
    batch = tr.data.train.gather(torch.arange(16))
    tr.train_step(batch, 0, 0)  # warm
    with DeviceWork() as work:
        tr.train_step(batch, 0, 1)
    return dict(work.syncs)


# ---- host syncs ---------------------------------------------------------------------------
@pytest.mark.parametrize("est,policy,strategy,expected", [
    ("vanilla", "threshold", "one_pass", {}),
    ("lai", "threshold=-inf", "one_pass", {}),          # score only
    ("lai", "percentile", "one_pass", {}),
    ("lai", "percentile", "two_pass", {}),              # kept rows found on the device
    ("ghost", "mean_std", "one_pass", {}),
    ("lai", "threshold", "one_pass", {"_local_scalar_dense": 1}),  # may drop everything
    ("lai", "mean_std", "two_pass", {"nonzero": 1}),    # kept count decides the shapes
])
def test_a_step_waits_for_the_device_only_for_a_decision(est, policy, strategy, expected):
    assert _syncs_of_a_step(cifar_trainer(est, policy, strategy)) == expected


def test_flush_reads_the_pending_steps_back_once_per_interval():
    tr = cifar_trainer("lai", "percentile")
    tr._refresh()
    for i in range(3):
        tr.train_step(tr.data.train.gather(torch.arange(16 * i, 16 * (i + 1))), 0, i)
    stats = loop_mod.EpochStats()
    tr._flush(0, 3, stats)
    assert (stats.steps, stats.seen, stats.kept) == (3, 48, 24)
    assert (tr._epoch_kept[:48] >= 0).all() and (tr._epoch_kept[48:] == -1).all()
    assert torch.isfinite(torch.from_numpy(tr._epoch_values[:48])).all()


# ---- record lines -------------------------------------------------------------------------
@pytest.mark.parametrize("log_every", [1, 4])
def test_step_lines_sum_up_log_every_steps(tiny_overrides, log_every):
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=lai", "trainer.epochs=2",
                                   f"trainer.log_every={log_every}", *tiny_overrides))
    lines = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text()
             .splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    per_epoch = s["steps"] // 2
    assert sum(r["steps"] for r in steps) == s["steps"]
    assert all(r["steps"] <= log_every for r in steps)
    if log_every == 1:
        assert [r["step"] for r in steps] == list(range(1, s["steps"] + 1))
    else:  # every log_every-th step, and the last step of each epoch
        ends = {per_epoch, 2 * per_epoch}
        assert [r["step"] for r in steps] == sorted(
            {k for k in range(1, s["steps"] + 1) if k % log_every == 0} | ends)
    for e in (0, 1):
        rows = [r for r in steps if r["epoch"] == e]
        assert sum(r["kept"] for r in rows) == s["samples_per_epoch"][e]
        assert sum(r["batch"] for r in rows) == s["history"][e]["seen"]
        mean_loss = sum(r["loss"] * r["batch"] for r in rows) / s["history"][e]["seen"]
        assert mean_loss == pytest.approx(s["history"][e]["train_loss"], rel=1e-9)


# ---- bf16 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("est,strategy", [("vanilla", "one_pass"), ("lai", "one_pass"),
                                          ("lai", "two_pass"), ("ghost", "one_pass")])
def test_bf16_trains_end_to_end_on_cpu(tiny_overrides, monkeypatch, est, strategy):
    dtypes = set()
    orig = loop_mod.forward_logits
    monkeypatch.setattr(loop_mod, "forward_logits",
                        lambda m, x: (lambda out: dtypes.add(out.dtype) or out)(orig(m, x)))
    s = run_experiment(compose_cfg("dataset=digits_n", f"estimator={est}", "trainer.epochs=2",
                                   "trainer.precision=bf16", f"trainer.strategy={strategy}",
                                   "save_scores=true", *tiny_overrides))
    assert s["status"] == "completed" and dtypes == {torch.bfloat16}
    assert s["final_test_acc"] > 0.3
    if est != "vanilla":
        assert 0 < s["kept_fraction"] < 1 and s["noisy_auc"] > 0.7


@pytest.mark.parametrize("est", ["lai", "ghost"])
def test_bf16_values_follow_fp32_values(est):
    """Same model, same batch: bf16 forwards give values close to the fp32 ones, and the
    estimator's own arithmetic stays fp32."""
    tr32 = cifar_trainer(est, "percentile")
    tr16 = cifar_trainer(est, "percentile", precision="bf16")
    tr16.model.load_state_dict(tr32.model.state_dict())
    raw = tr32.data.train.gather(torch.arange(32))
    batch = type(raw)(tr32._prepare(raw.inputs, False), raw.labels, raw.idx)
    out = []
    for tr in (tr32, tr16):
        tr._refresh(batch)  # the batch itself as V: the same cache up to precision
        out.append(tr.curator.score(batch))
    v32, v16 = out
    assert v16.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([v32, v16]))[0, 1]
    assert corr > 0.99, float(corr)
    assert float((v16 - v32).norm() / v32.norm()) < 0.05
    if est == "lai":
        assert tr16.est.M and all(m.dtype == torch.float32 for m in tr16.est.M.values())


# ---- channels-last ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lai", "lli", "ghost"])
def test_channels_last_gives_the_same_values(method):
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = CNN().train()
        model(torch.randn(8, 3, 10, 10))
        model.eval()
        tr = (torch.randn(6, 3, 10, 10), torch.randint(0, 4, (6,)))
        va = (torch.randn(5, 3, 10, 10), torch.randint(0, 4, (5,)))
        ref = value(model, tr, va, method=method)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        as_cl = lambda b: (b[0].contiguous(memory_format=torch.channels_last), b[1])  # noqa
        got = value(cl, as_cl(tr), as_cl(va), method=method)
    finally:
        torch.set_default_dtype(torch.float32)
    assert float((got - ref).norm() / ref.norm()) < 1e-12


def test_channels_last_trainer_converts_model_and_batches():
    tr = cifar_trainer("lai", "percentile", channels_last=True)
    conv = tr.model.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = tr._prepare(tr.data.train.gather(torch.arange(4)).inputs, True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert _syncs_of_a_step(tr) == {}
    auto = cifar_trainer("lai", "percentile")  # auto: only on CUDA
    assert not auto.channels_last


def test_lai_reads_channels_last_layer_inputs_without_copying_them():
    """Conv inputs are flattened in (H, W, C) order (views); the cache is re-laid once."""
    copies = {}
    for est in ("vanilla", "lai"):
        tr = cifar_trainer(est, "percentile", channels_last=True)
        if est == "lai":
            tr._refresh()
        batch = tr.data.train.gather(torch.arange(16))
        tr.train_step(batch, 0, 0)
        with DeviceWork(trace=True) as work:
            tr.train_step(batch, 0, 1)
        copies[est] = work.trace["clone"] + work.trace["copy_"] + work.trace["_to_copy"]
    assert copies["lai"] <= copies["vanilla"] + 1  # + the policy's mask cast, at most


# ---- compile ------------------------------------------------------------------------------
def test_compile_runs_the_hook_free_forwards_compiled(tiny_overrides, monkeypatch):
    """torch.compile (dynamo with the eager backend here, to keep the test fast) for the
    second pass and evaluation; the hooked scoring forward runs the eager model. Training
    is the same as without compile."""
    from lai.train import accel

    calls = []
    real = torch.compile
    monkeypatch.setattr(accel.torch, "compile",
                        lambda m, **k: calls.append(m) or real(m, backend="eager"))
    runs = {}
    for flag in ("false", "true"):
        torch.manual_seed(0)
        runs[flag] = run_experiment(compose_cfg(
            "dataset=digits_n", "estimator=lai", "trainer.epochs=1", "trainer.strategy=two_pass",
            "policy=percentile", f"trainer.compile={flag}", *tiny_overrides))
    assert len(calls) == 1
    a, b = runs["false"], runs["true"]
    assert a["samples_per_epoch"] == b["samples_per_epoch"]
    assert b["final_test_loss"] == pytest.approx(a["final_test_loss"], rel=1e-6)


# ---- memory of a step ---------------------------------------------------------------------
@pytest.mark.parametrize("est", ["lai", "ghost"])
def test_two_pass_frees_the_scoring_logits_before_the_second_pass(est, monkeypatch):
    """The scoring forward's logits give the batch's losses, then go: they are not alive
    during the kept rows' forward and backward (an LM's [B, T, vocab] held through that
    peak)."""
    import weakref

    tr = cifar_trainer(est, "percentile", "two_pass")
    tr._refresh()
    scored, alive_in_second_pass = [], []
    orig = loop_mod.per_sample_loss

    def losses_of(logits, labels):  # the first call: the scoring forward's logits
        scored.append(weakref.ref(logits))
        return orig(logits, labels)

    monkeypatch.setattr(loop_mod, "per_sample_loss", losses_of)
    hook = tr.model.register_forward_pre_hook(
        lambda mod, args: alive_in_second_pass.append(scored[0]() is not None)
        if scored else None)
    try:
        tr.train_step(tr.data.train.gather(torch.arange(16)), 0, 0)
    finally:
        hook.remove()
    # the hook ran twice: the scoring forward (nothing scored yet: not recorded) and the
    # second pass, where the scoring logits must already be gone
    assert len(scored) == 2 and alive_in_second_pass == [False]


def test_steps_run_in_train_mode_after_evaluation_and_refresh(monkeypatch):
    """A step switches every module to train mode when the model is not in it (the first
    step, after an evaluation or an eval-mode refresh), and skips the walk over all modules
    when it is."""
    from lai.train.evaluate import evaluate

    tr = cifar_trainer("lai", "percentile")
    assert tr.curator.val_mode == "eval"
    walks = []
    orig = type(tr.model).train
    monkeypatch.setattr(type(tr.model), "train",
                        lambda self, mode=True: walks.append(mode) or orig(self, mode))
    batch = tr.data.train.gather(torch.arange(16))
    tr._refresh()
    tr.model.eval()
    walks.clear()
    tr.train_step(batch, 0, 0)
    assert walks == [True] and all(m.training for m in tr.model.modules())
    tr.train_step(batch, 0, 1)
    assert walks == [True]  # already in train mode: no walk
    tr._refresh()  # eval-mode refresh: switched and restored
    evaluate(tr.model, tr.data.test, tr.data, tr.device, 8)
    walks.clear()
    tr.train_step(batch, 0, 2)
    assert all(m.training for m in tr.model.modules())
    assert walks == []  # both restored train mode for the whole model on their own
