"""Learning-rate schedules: ``warm_restarts`` is torch's CosineAnnealingWarmRestarts per epoch."""
from __future__ import annotations

import pytest
import torch

from lai.config import ConfigError, validate
from lai.train.optim import build_scheduler
from tests.conftest import compose_cfg


@pytest.mark.parametrize("period,mult", [(10, 2), (3, 1), (2, 3)])
def test_warm_restarts_equals_torch_stepped_per_epoch(period, mult):
    steps_per_epoch, epochs = 4, 40
    cfg = compose_cfg("trainer.schedule=warm_restarts", f"trainer.restart_epochs={period}",
                      f"trainer.restart_mult={mult}", "trainer.lr=0.01")
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ours = build_scheduler(ours_opt, cfg.trainer, epochs * steps_per_epoch, steps_per_epoch)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, T_0=period,
                                                               T_mult=mult)
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):  # constant within an epoch
            assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
            ours_opt.step()
            ours.step()
        ref_opt.step()
        ref.step()


def test_paper_code_cycles_fill_310_epochs():
    cfg = compose_cfg("trainer.schedule=warm_restarts", "trainer.lr=1.0")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.trainer, 311, 1)
    lrs = []
    for _ in range(311):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    restarts = [e for e in range(1, 311) if lrs[e] > lrs[e - 1]]
    assert restarts == [10, 30, 70, 150, 310]  # cycles of 10, 20, 40, 80, 160 epochs


def test_bad_restart_options():
    with pytest.raises(ConfigError, match="restart_epochs"):
        validate(compose_cfg("trainer.schedule=warm_restarts", "trainer.restart_epochs=0"))
