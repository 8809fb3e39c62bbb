"""On a CUDA device, LAI/LLI values equal the CPU float64 values (skipped without a GPU)."""
from __future__ import annotations

import copy

import pytest
import torch

from lai import value
from tests.estimators.nets import CNN, PaddedTransformer, token_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return tuple(t.to(device) for t in batch)


@pytest.mark.parametrize("method", ["lai", "lli"])
def test_cuda_matches_cpu_float64(method):
    torch.manual_seed(0)
    for model, tr, va in [
        (CNN().double().train(), (torch.randn(6, 3, 10, 10, dtype=torch.float64),
                                  torch.randint(0, 4, (6,))),
         (torch.randn(5, 3, 10, 10, dtype=torch.float64), torch.randint(0, 4, (5,)))),
        (PaddedTransformer().double(), token_batch(6, 9, 30, 3, 1), token_batch(5, 12, 30, 3, 2)),
    ]:
        cpu = value(model, tr, va, method=method)
        gpu_model = copy.deepcopy(model).cuda()
        gpu = value(gpu_model, _to(tr, "cuda"), _to(va, "cuda"), method=method).cpu()
        assert float((gpu - cpu).norm() / cpu.norm()) < 1e-9


def test_ghost_probe_form_on_cuda_matches_cpu_float64():
    from lai.batching import as_batch
    from lai.estimators.ghost import GhostEstimator

    torch.manual_seed(0)
    model = CNN().double().eval()
    tr = (torch.randn(6, 3, 10, 10, dtype=torch.float64), torch.randint(0, 4, (6,)))
    va = (torch.randn(5, 3, 10, 10, dtype=torch.float64), torch.randint(0, 4, (5,)))
    cpu = value(model, tr, va, method="ghost")  # forward mode, on the CPU
    gpu_model = copy.deepcopy(model).cuda()
    est = GhostEstimator(mode="probe")
    est.refresh(gpu_model, as_batch(_to(va, "cuda")))
    gpu = est.probe_values(gpu_model, as_batch(_to(tr, "cuda"))).cpu()
    assert float((gpu - cpu).norm() / cpu.norm()) < 1e-9
