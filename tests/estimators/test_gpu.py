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
    from lai.estimators.online.ghost import GhostEstimator

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


def test_offloaded_cache_on_cuda_same_values_less_device_memory():
    """``offload=True`` on CUDA (pinned host entries, side-stream prefetch): the same values as
    the device-resident cache, and a lower allocator peak over refresh and scoring steps. The
    cache (about 90 MB) dwarfs what the allocator may add on its own (cuBLAS workspaces), and
    both variants run once before anything is measured."""
    transformers = pytest.importorskip("transformers")
    from lai.batching import as_batch, forward_logits
    from lai.estimators.online.lai import LAIEstimator

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=1024,
                                  max_position_embeddings=64, num_labels=100,
                                  attn_implementation="eager")
    model = transformers.BertForSequenceClassification(cfg).cuda().eval()
    train = as_batch(_to(token_batch(4, 64, 30, 100, 1), "cuda"))
    val = as_batch(_to(token_batch(32, 64, 30, 100, 2), "cuda"))

    def run(offload: bool, steps: int = 3):
        est = LAIEstimator(cache="folded", offload=offload, lookahead=1)
        vals = []
        with torch.no_grad():
            est.refresh(model, val)
            for _ in range(steps):
                with est.capture(model, train) as cap:
                    forward_logits(model, train.inputs)
                vals.append(est.score(cap))
        return est, vals

    for offload in (False, True):  # warm-up: workspaces, kernels, pinned-memory pools
        run(offload, 1)
    out, peak = {}, {}
    for offload in (False, True):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        est, out[offload] = run(offload)
        torch.cuda.synchronize()
        peak[offload] = torch.cuda.max_memory_allocated() - base
        # copies freed while their record_stream event was pending are returned to the
        # allocator's count when the events are processed, which empty_cache forces
        torch.cuda.empty_cache()
        if offload:
            cache = est.cache_bytes()
            assert cache > 64 * 2**20
            assert torch.cuda.memory_allocated() - base < cache / 4  # held on the host
            assert all(t.is_pinned() for t in est.M.values())
        del est
    for a, b in zip(out[False], out[True]):
        assert torch.allclose(a, b, rtol=1e-6, atol=0), (a, b)
    # a few entries in flight at a time (the largest is 26 MB here) against all of them
    assert peak[True] < peak[False] - cache / 4


def test_buffer_snapshot_on_the_host_restores_cuda_buffers():
    """``BufferSnapshot(host=True)``: the copies of CUDA buffers live in host memory (no
    device memory), are taken once while unchanged, and a buffer that a scoring forward
    changed is copied back from the host."""
    from lai.estimators.capture import BufferSnapshot, preserved_buffers
    from tests.estimators.test_preserved_buffers import Counting

    model = Counting(CNN()).cuda().train()
    model.register_buffer("mask", torch.ones(64, 64, dtype=torch.bool, device="cuda"))
    model(torch.randn(8, 3, 10, 10, device="cuda"))
    snap = BufferSnapshot(host=True)
    ids = []
    for _ in range(2):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad(), preserved_buffers(model, snap):
            model(torch.randn(4, 3, 10, 10, device="cuda"))
        torch.cuda.synchronize()
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert all(c.device.type == "cpu" for _, c, _ in snap._entries.values())
        ids.append(id(snap._entries[id(model.mask)][1]))
    assert ids[0] == ids[1]  # the unchanged mask was copied once


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_ghost_forward_fast_paths_on_cuda(autocast):
    """Ghost's forward form on CUDA with the fast paths (cuDNN BatchNorm in train mode, its
    lean tangent from the kernel's own statistics; channels-last; bf16 autocast) against the
    same step with PyTorch's formulas: the same training gradients, values equal to rounding
    (bf16: to 2% of the largest), and in fp32 both equal to the CPU float64 values to 1e-4."""
    from lai.batching import as_batch, forward_logits, per_sample_loss
    from lai.estimators.online.ghost import GhostEstimator

    torch.manual_seed(0)
    model = CNN().double().train()
    tr = (torch.randn(8, 3, 10, 10, dtype=torch.float64), torch.randint(0, 4, (8,)))
    va = (torch.randn(5, 3, 10, 10, dtype=torch.float64), torch.randint(0, 4, (5,)))

    def step(m, train, val, fast, ctx):
        est = GhostEstimator(mode="forward", forward_fastpaths=fast)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        est.refresh(m, as_batch(val))
        m.zero_grad(set_to_none=True)
        batch = as_batch(train)
        with est.capture(m, batch) as cap, ctx():
            logits = forward_logits(m, batch.inputs)
        per_sample_loss(logits.float(), batch.labels).mean().backward()
        m.load_state_dict(state)
        return est.score(cap).double().cpu(), [p.grad.double().cpu() for p in m.parameters()]

    cpu_values, _ = step(model, tr, va, True, torch.enable_grad)
    gpu_model = copy.deepcopy(model).float().cuda().to(memory_format=torch.channels_last)
    train = (tr[0].float().cuda().contiguous(memory_format=torch.channels_last), tr[1].cuda())
    val = (va[0].float().cuda(), va[1].cuda())
    ctx = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast
           else torch.enable_grad)
    fast_v, fast_g = step(gpu_model, train, val, True, ctx)
    ref_v, ref_g = step(gpu_model, train, val, False, ctx)
    assert all(torch.equal(a, b) for a, b in zip(fast_g, ref_g))
    tol = 0.02 if autocast else 1e-5
    assert float((fast_v - ref_v).abs().max()) <= tol * float(ref_v.abs().max())
    if not autocast:
        assert float((fast_v - cpu_values).norm() / cpu_values.norm()) < 1e-4
