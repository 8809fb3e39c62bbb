"""Static IP against torch.func, and the two-round runner end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lai import value
from lai.config import ConfigError
from lai.train.runner import run_experiment
from tests.conftest import compose_cfg
from tests.estimators import brute
from tests.estimators.nets import CNN, MLP


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_ip_equals_torch_func_gradients(net):
    torch.manual_seed(0)
    model = (MLP() if net == "mlp" else CNN().eval()).double()
    shape = (12,) if net == "mlp" else (3, 10, 10)
    classes = 5 if net == "mlp" else 4
    xt, xv = torch.randn(6, *shape, dtype=torch.float64), torch.randn(4, *shape,
                                                                     dtype=torch.float64)
    yt, yv = torch.randint(0, classes, (6,)), torch.randint(0, classes, (4,))
    names = [n for n, _ in model.named_parameters()]
    ref = brute.per_sample_grads(model, names, xt, yt) @ \
        brute.per_sample_grads(model, names, xv, yv).sum(0)
    v = value(model, (xt, yt), (xv, yv), method="ip")
    assert float((v - ref).norm() / ref.norm()) < 1e-6


def test_two_round_ip_records(tiny_overrides):
    s = run_experiment(compose_cfg("dataset=digits_n", "estimator=ip", "trainer.epochs=4",
                                   *tiny_overrides))
    run = Path(s["run_dir"])
    assert s["runner"] == "two_round" and s["status"] == "completed"
    scores = np.load(run / "static_scores.npy")
    removed = np.load(run / "removed_indices.npy")
    assert scores.shape == (s["n_train"],) and scores.dtype == np.float32
    assert np.array_equal(removed, np.flatnonzero(scores < 0))  # threshold 0
    assert s["removed"] == len(removed) and s["kept_train"] == s["n_train"] - len(removed)
    assert s["samples_per_epoch"] == [s["kept_train"]] * 4  # round 2 trains on the rest
    assert 0 <= s["removed_noisy"] <= s["removed"]
    assert s["noisy_auc"] > 0.6  # IP on the trained model ranks noisy labels low
    rounds = {json.loads(x).get("round") for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert {1, 2} <= rounds
    assert "final_test_acc" in s["round1"]


def test_static_and_runner_must_match():
    from lai.config import validate

    with pytest.raises(ConfigError, match="runner=two_round"):
        validate(compose_cfg("estimator=ip", "runner=online"))
    with pytest.raises(ConfigError, match="runner=online"):
        validate(compose_cfg("estimator=lai", "runner=two_round"))


def test_round1_is_shared_by_static_methods_and_changes_nothing(tiny_overrides, tmp_path):
    """IP then LiSSA on the same data/model/trainer/seed: LiSSA loads IP's round 1 from the
    store instead of training it, and ends exactly as a LiSSA run that trained its own."""
    args = ["dataset=digits_n", "trainer.epochs=2", "trainer.eval_every_epoch=false"]
    ip = run_experiment(compose_cfg(*args, "estimator=ip", *tiny_overrides))
    lissa = run_experiment(compose_cfg(*args, "estimator=lissa", "estimator.lissa_depth=5",
                                       *tiny_overrides))
    assert ip["round1_from"] is None
    assert lissa["round1_from"] is not None and Path(lissa["round1_from"]).is_file()
    assert lissa["round1"] == ip["round1"]
    lines = [json.loads(x) for x in (Path(lissa["run_dir"]) / "metrics.jsonl").read_text()
             .splitlines()]
    assert [x for x in lines if x["kind"] == "round1_reused"]
    assert not [x for x in lines if x.get("round") == 1 and x["kind"] == "epoch"]
    alone = run_experiment(compose_cfg(*args, "estimator=lissa", "estimator.lissa_depth=5",
                                       f"results_dir={tmp_path / 'alone'}",
                                       "trainer.progress=false", "device=cpu"))
    assert alone["round1_from"] is None
    for key in ("final_test_acc", "removed", "samples_per_epoch", "noisy_auc"):
        assert alone[key] == lissa[key], key
    assert np.array_equal(np.load(Path(alone["run_dir"]) / "static_scores.npy"),
                          np.load(Path(lissa["run_dir"]) / "static_scores.npy"))
    # another trainer setting is another round 1
    other = run_experiment(compose_cfg(*args, "estimator=ip", "trainer.lr=0.05",
                                       *tiny_overrides))
    assert other["round1_from"] is None


def test_two_round_lissa_records_the_solve_and_fails_when_it_diverges(tiny_overrides):
    from lai.estimators.static.lissa import LissaDivergedError

    args = ["dataset=digits_n", "estimator=lissa", "trainer.epochs=1",
            "estimator.lissa_depth=20", *tiny_overrides]
    s = run_experiment(compose_cfg(*args))
    assert s["status"] == "completed"
    assert s["lissa_scale"] > 0 and 0 <= s["lissa_residual"] and s["lissa_steps"][0] <= 20
    with pytest.raises(LissaDivergedError):
        run_experiment(compose_cfg(*args, "estimator.lissa_scale=1e-4", "estimator.damping=0"))
    import json
    from pathlib import Path
    failed = [json.loads(p.read_text()) for p in Path(tiny_overrides[0].split("=", 1)[1])
              .rglob("summary.json")]
    assert any(f["status"] == "failed" and "diverged" in f["error"] for f in failed)
