"""lai.Curator in a user's own loop curates exactly as run.py's trainer does, for every
strategy and form, and each step forwards the training batch once."""
from __future__ import annotations

import math

import pytest
import torch

from lai import Curator
from lai.batching import forward_logits
from lai.train.optim import build_optimizer
from lai.train.runner import run_experiment
from tests.conftest import compose_cfg


def trainer_and_data(tiny_overrides, *extra):
    """A 1-epoch digits run through run.py, returning the summary, the data and the config."""
    import lai.train.runner as runner_mod
    from lai.data import build_data, resolve_data_dir
    from lai.models import build_model

    cfg = compose_cfg("dataset=digits_n", "trainer.epochs=1", "trainer.batch_size=64",
                      "trainer.eval_every_epoch=false", *extra, *tiny_overrides)
    seen = {}
    orig = runner_mod.Trainer.fit

    def fit(self):
        out = orig(self)
        seen["params"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return out

    runner_mod.Trainer.fit = fit
    try:
        summary = run_experiment(cfg)
    finally:
        runner_mod.Trainer.fit = orig
    runner_mod.seed_everything(cfg.seed)
    data = build_data(cfg.dataset, data_dir=resolve_data_dir(cfg.data_dir), seed=cfg.seed)
    runner_mod.seed_everything(cfg.seed)
    model = build_model(cfg.model, task=data.task, num_classes=data.num_classes,
                        input_shape=tuple(data.train.inputs.shape[1:]))
    return summary, seen["params"], data, model, cfg


@pytest.mark.parametrize("extra", [
    ("estimator=lai", "policy=threshold"),
    ("estimator=lli", "policy=percentile", "trainer.strategy=two_pass"),
    ("estimator=ghost", "policy=mean_std"),
    ("estimator=ghost", "policy=score_only"),           # the probe form: values after backward
    ("estimator=lai", "policy=threshold", "estimator.refresh_every=3",
     "estimator.val_fraction=0.5", "policy.start_epoch=0"),
    ("estimator=lai", "policy=threshold", "trainer.optimizer=adam",
     "estimator.precondition=adam"),
    ("estimator=lli", "policy=threshold", "estimator.self_influence=true"),
], ids=["lai", "lli-two-pass", "ghost-forward", "ghost-probe", "lai-refresh3", "lai-adam",
        "lli-self-influence"])
def test_a_user_loop_with_curator_equals_the_trainer(tiny_overrides, extra):
    summary, trained, data, model, cfg = trainer_and_data(tiny_overrides, *extra)
    opt = build_optimizer(model, cfg.trainer)
    e = cfg.estimator
    curator = Curator(model, None if e.self_influence else data.val, e.name, cfg.policy.name,
                      policy_options={k: v for k, v in cfg.policy.items()
                                      if k in ("threshold", "keep_fraction", "k")
                                      and k in {"threshold": ("threshold",),
                                                "percentile": ("keep_fraction",),
                                                "mean_std": ("k",)}.get(cfg.policy.name, ())},
                      start_epoch=cfg.policy.start_epoch, val_fraction=e.val_fraction,
                      refresh_every=e.refresh_every, strategy=cfg.trainer.strategy,
                      seed=cfg.seed + 1, optimizer=opt, precondition=e.precondition,
                      self_influence=e.self_influence)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data.train), generator=gen)
    bs, kept = cfg.trainer.batch_size, 0
    model.train()
    for i in range(math.ceil(len(order) / bs)):
        batch = data.train.gather(order[i * bs:(i + 1) * bs])
        with curator.step(batch, epoch=0) as step:
            outputs = forward_logits(model, batch.inputs)
        if step.two_pass:
            outputs = forward_logits(model, step.kept_batch.inputs)
        loss = step.loss(outputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step.keep is None or bool(step.keep.any()):
            opt.step()
        assert step.values is not None and step.values.shape == (len(batch),)
        kept += int(step.keep.sum())
    assert kept == summary["samples_per_epoch"][0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_one_forward_of_the_training_batch_per_step():
    """lai, lli and Ghost's probe form ride on the training forward: the model runs once per
    step (no extra forward of the batch); a refresh runs its own forward of validation rows."""
    from tests.estimators.nets import MLP

    torch.manual_seed(0)
    x, y = torch.randn(40, 12), torch.randint(0, 5, (40,))
    for method, policy in (("lai", "threshold"), ("lli", "threshold"), ("ghost", "score_only")):
        model = MLP()
        curator = Curator(model, (x[:20], y[:20]), method, policy, val_fraction=0.5,
                          refresh_every=1000)
        calls = []
        model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
        with curator.step((x[20:], y[20:])) as step:  # step 0 refreshes: 10 rows of V
            out = model(x[20:])
        step.loss(out).backward()
        # the training batch (20 rows): once; the rest is the refresh's validation forward
        # (10 rows; Ghost's first refresh also tries its probe form on 8 of them)
        assert calls.count(20) == 1 and calls[-1] == 20 and max(calls[:-1]) <= 10, \
            (method, calls)
        assert step.values.shape == (20,) and torch.isfinite(step.values).all()


def test_bad_settings_are_clear_errors():
    from tests.estimators.nets import MLP

    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    with pytest.raises(ValueError, match="needs val_data"):
        Curator(MLP(), None, "lai")
    with pytest.raises(ValueError, match="strategy"):
        Curator(MLP(), (x, y), "lai", strategy="three_pass")
    with pytest.raises(ValueError, match="unknown estimator|unknown policy"):
        Curator(MLP(), (x, y), "lai", "nope")
    with pytest.raises(ValueError, match="pass optimizer="):
        Curator(MLP(), (x, y), "lai", precondition="adam")
    with pytest.raises(ValueError, match="give no val_data"):
        Curator(MLP(), (x, y), "lai", self_influence=True)


def test_validation_sources():
    """A batch, a map-style dataset, a DataLoader: each refresh draws from it (a fraction of
    the rows, or the loader's next batch), on the model's device."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.estimators.nets import MLP

    torch.manual_seed(0)
    x, y = torch.randn(40, 12), torch.randint(0, 5, (40,))
    model = MLP()
    for val, n in (((x, y), 10), (TensorDataset(x, y), 10),
                   (DataLoader(TensorDataset(x, y), batch_size=8), 8)):
        curator = Curator(model, val, "lli", val_fraction=0.25)
        curator.refresh()
        assert len(curator.last_val_batch) == n, type(val).__name__
        with curator.step((x[:6], y[:6])) as step:
            out = model(x[:6])
        step.loss(out)
        assert step.values.shape == (6,)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # 3 batches, then again
    curator = Curator(model, loader, "lli", refresh_every=1)
    sizes = []
    for _ in range(4):
        curator.refresh()
        sizes.append(len(curator.last_val_batch))
    assert sizes == [16, 16, 8, 16]
