"""Data-parallel training over two CPU processes (gloo) equals one process: the ranks'
validation-cache parts are summed (the estimators are linear in V), each rank scores its
share of the batch, gradients are summed."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lai.data import build_data
from lai.estimators.registry import build_estimator, estimator_options
from lai.models import build_model
from lai.policies import build_policy_from_config
from lai.train.loop import Trainer
from lai.train.records import NullRecorder
from lai.train.runner import seed_everything
from tests.conftest import compose_cfg


def _train(cfg) -> dict:
    """A few steps of the online trainer; the values, keep decisions and parameters."""
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    data = build_data(cfg.dataset, data_dir="/nonexistent", seed=cfg.seed)
    model = build_model(cfg.model, task=data.task, num_classes=data.num_classes,
                        input_shape=tuple(data.train.inputs.shape[1:]))
    est = build_estimator(estimator_options(cfg.estimator))
    est.prepare_data_parallel()  # LAI: the folded cache, a sum over validation rows
    trainer = Trainer(model, data, est, build_policy_from_config(cfg.policy), cfg.trainer,
                      cfg.estimator, torch.device("cpu"), NullRecorder(), seed=cfg.seed)
    summary = trainer.fit()
    return {"values": trainer._epoch_values, "kept": trainer._epoch_kept,
            "params": {k: v.clone() for k, v in model.state_dict().items()},
            "samples": summary["samples_per_epoch"], "skipped": summary["skipped_steps"]}


def _worker(rank: int, world: int, init: str, cfgs: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = {name: _train(cfg) for name, cfg in cfgs.items()}
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    # ghost + score_only runs Ghost's probe form: values read after the backward, each rank
    # rescaling by the global loss coefficient
    runs = {"lai": ("estimator=lai",), "ghost": ("estimator=ghost",),
            "ghost_probe": ("estimator=ghost", "policy=score_only")}
    cfgs = {name: compose_cfg("dataset=digits_n", *over, "trainer.max_steps=4",
                              "trainer.progress=false", "trainer.log_every=2", "device=cpu")
            for name, over in runs.items()}
    out = str(tmp_path / "rank0.pt")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", cfgs, out), nprocs=2, join=True)
    both = torch.load(out, weights_only=False)  # written by this test's workers
    for est, cfg in cfgs.items():
        _compare(_train(cfg), both[est], cfg)


def _compare(one: dict, two: dict, cfg) -> None:
    scored = np.isfinite(one["values"])
    assert scored.sum() == 4 * cfg.trainer.batch_size
    assert np.array_equal(scored, np.isfinite(two["values"]))  # every sample scored once
    np.testing.assert_allclose(two["values"][scored], one["values"][scored],
                               rtol=1e-4, atol=1e-6)
    assert np.array_equal(two["kept"], one["kept"])
    assert two["samples"] == one["samples"] and two["skipped"] == one["skipped"]
    for k, v in one["params"].items():
        torch.testing.assert_close(two["params"][k], v, rtol=1e-5, atol=1e-6)
