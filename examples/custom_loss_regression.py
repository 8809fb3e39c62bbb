"""Curate a regression with its own per-sample loss (MSE): corrupted targets get dropped.

    python examples/custom_loss_regression.py

Any per-sample loss works (``loss_fn(outputs, labels) -> [B]``); its output gradient comes
from autograd. Here a third of the training targets are replaced by large random numbers.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import lai


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.squeeze(-1) - targets) ** 2  # [B]: one loss per sample


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    w = torch.randn(8, generator=gen)
    x = torch.randn(args.steps * 32, 8, generator=gen)
    y = x @ w + 0.1 * torch.randn(len(x), generator=gen)
    corrupt = torch.rand(len(x), generator=gen) < 0.33
    y = torch.where(corrupt, 5 * torch.randn(len(x), generator=gen), y)
    xv = torch.randn(64, 8, generator=gen)
    yv = xv @ w

    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    curator = lai.Curator(model, (xv, yv), method="ghost", policy="threshold",
                          val_fraction=0.5, loss_fn=mse)
    dropped_corrupt = n_corrupt = kept = 0
    for i in range(args.steps):
        rows = slice(i * 32, (i + 1) * 32)
        with curator.step((x[rows], y[rows])) as step:
            out = model(x[rows])
        loss = step.loss(out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kept += int(step.keep.sum())
        dropped_corrupt += int((~step.keep & corrupt[rows]).sum())
        n_corrupt += int(corrupt[rows].sum())
    with torch.no_grad():
        val_mse = float(mse(model(xv), yv).mean())
    out = {"corrupt_dropped": dropped_corrupt / max(1, n_corrupt),
           "kept_fraction": kept / len(x), "val_mse": val_mse}
    print(f"dropped {out['corrupt_dropped']:.0%} of the corrupted targets, kept "
          f"{out['kept_fraction']:.0%} of all samples; validation MSE {val_mse:.3f}")
    return out


if __name__ == "__main__":
    main()
