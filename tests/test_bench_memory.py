"""PeakTensorMemory: exact byte counts for known allocations, and a small MLP's activations."""
from __future__ import annotations

import torch

from lai.bench.memory import PeakTensorMemory

MB4 = 1000 * 1000 * 4  # a 1000x1000 float32


def test_allocation_view_and_free():
    with PeakTensorMemory(scan_gc=False) as m:
        a = torch.empty(1000, 1000)
        v = a[10:].reshape(-1)  # a view: same storage
        w = a.t().detach()
    assert (m.start_bytes, m.peak_bytes, m.end_bytes) == (0, MB4, MB4)
    del a, v, w
    with PeakTensorMemory(scan_gc=False) as m:
        for _ in range(3):  # each temporary is freed before the next one exists
            t = torch.ones(1000, 1000)
            del t
        keep = torch.zeros(10, dtype=torch.float64)
    assert (m.peak_bytes, m.end_bytes) == (MB4, 80)
    with PeakTensorMemory(scan_gc=False) as m:
        s = torch.tensor([1.0, 2.0], dtype=torch.float64)  # lift_fresh: a new storage
    assert (m.start_bytes, m.end_bytes) == (0, 16)
    with PeakTensorMemory(scan_gc=False) as m:
        z = torch._efficientzerotensor(1000)  # forward-mode AD's zeros: no memory behind it
    assert m.peak_bytes == 0
    del keep, s, z


def test_alive_at_start_counted_once():
    x = torch.zeros(1000, 1000)
    y = x[:500]  # a view of x
    with PeakTensorMemory(x, y, scan_gc=False) as m:  # given as a root
        z = x + 1
    assert m.start_bytes == MB4 and m.peak_bytes == 2 * MB4 and m.end_bytes == 2 * MB4
    with PeakTensorMemory(scan_gc=False) as m:  # not given: counted from when it is read
        x.add_(1)  # (z, never touched, is not seen without the gc scan)
    assert (m.start_bytes, m.peak_bytes, m.end_bytes) == (MB4, MB4, MB4)
    with PeakTensorMemory() as m:  # x and z found by the gc scan
        del z
    assert m.start_bytes >= 2 * MB4 and m.end_bytes == m.start_bytes - MB4
    with PeakTensorMemory(scan_gc=False, device="meta") as m:  # other devices are not counted
        x.mul_(2)
        torch.empty(1000, 1000)
    assert m.peak_bytes == 0


def _mlp(d=20, h=100, c=5, layers=3) -> torch.nn.Sequential:
    mods: list[torch.nn.Module] = [torch.nn.Linear(d, h, bias=False), torch.nn.ReLU()]
    for _ in range(layers - 2):
        mods += [torch.nn.Linear(h, h, bias=False), torch.nn.ReLU()]
    mods.append(torch.nn.Linear(h, c, bias=False))
    return torch.nn.Sequential(*mods).double()


def test_mlp_saved_activations_and_gradients():
    torch.manual_seed(0)
    b, d, h = 32, 20, 100
    model = _mlp(d, h)
    x = torch.randn(b, d, dtype=torch.float64)
    param_bytes = sum(p.numel() * 8 for p in model.parameters())
    act = b * h * 8  # one hidden activation
    with PeakTensorMemory(model, x, scan_gc=False) as fwd:
        loss = model(x).sum()
    assert fwd.start_bytes == param_bytes + x.numel() * 8
    # by hand: each ReLU saves its output (the next Linear saves the same tensor); the
    # pre-activation is freed after the ReLU. Peak at the 2nd ReLU: r1 (saved) + its input
    # + r2; after the forward: r1, r2 and the scalar loss.
    assert fwd.peak_bytes - fwd.start_bytes == 3 * act
    assert fwd.end_bytes - fwd.start_bytes == 2 * act + 8
    with PeakTensorMemory(model, x, scan_gc=False) as bwd:
        loss.backward()
    # the saved activations were alive before the region: counted at the start
    assert bwd.start_bytes == fwd.end_bytes
    # after the backward: the saved activations are freed and the gradients exist
    assert bwd.end_bytes - bwd.start_bytes == param_bytes - 2 * act
    assert bwd.peak_bytes > bwd.start_bytes
    del loss
    model.zero_grad(set_to_none=True)
    with PeakTensorMemory(model, x, scan_gc=False) as step:
        model(x).sum().backward()
    assert step.peak_bytes > param_bytes + 2 * act + x.numel() * 8
    assert step.end_bytes == param_bytes * 2 + x.numel() * 8  # parameters + gradients + x


def test_no_grad_forward_peak_is_lower():
    torch.manual_seed(0)
    model = _mlp(layers=4)
    x = torch.randn(64, 20, dtype=torch.float64)
    with PeakTensorMemory(model, x, scan_gc=False) as grad_mode:
        out = model(x)
    del out
    with torch.no_grad(), PeakTensorMemory(model, x, scan_gc=False) as no_grad:
        out = model(x)
    act = 64 * 100 * 8
    assert no_grad.start_bytes == grad_mode.start_bytes
    assert no_grad.peak_bytes - no_grad.start_bytes == 2 * act  # a ReLU's input and output
    assert grad_mode.peak_bytes - grad_mode.start_bytes == 4 * act  # r1, r2 saved, h3, r3
    assert no_grad.end_bytes - no_grad.start_bytes == 64 * 5 * 8  # the output only


def test_tracks_autograd_and_is_reusable():
    x = torch.randn(100, 100, dtype=torch.float64, requires_grad=True)
    mem = PeakTensorMemory(x, scan_gc=False)
    for start in (80_000, 160_000):  # the second time, x.grad exists at the start
        with mem:
            (x.exp() * 2).sum().backward()  # exp saves its output; mul makes another
        assert mem.start_bytes == start
        assert mem.peak_bytes >= mem.start_bytes + 2 * 80_000
