"""Curate a plain PyTorch training loop with LAI: a torchvision ResNet-18, noisy labels.

    python examples/plain_loop.py            # a few seconds on a CPU, nothing downloaded

The data are random images whose class decides a coloured square in one corner; 40% of the
training labels are replaced by random classes. LAI values every batch against a clean
validation set inside the training forward and drops the samples with negative value.
"""
from __future__ import annotations

import argparse

import torch
import torchvision

import lai


def make_data(n: int, noise: float, gen: torch.Generator):
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 3, 32, 32, generator=gen) * 0.3
    for c in range(4):  # class c lights up corner c
        r, s = divmod(c, 2)
        x[y == c, :, r * 16:r * 16 + 8, s * 16:s * 16 + 8] += 2.0
    noisy = torch.rand(n, generator=gen) < noise
    labels = torch.where(noisy, torch.randint(0, 4, (n,), generator=gen), y)
    return x, labels, noisy & (labels != y)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y, noisy = make_data(args.steps * args.batch, 0.4, gen)
    xv, yv, _ = make_data(64, 0.0, gen)  # a small clean validation set

    model = torchvision.models.resnet18(num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    curator = lai.Curator(model, (xv, yv), method="lai", policy="threshold",
                          val_fraction=0.5)
    kept = dropped_noisy = n_noisy = 0
    model.train()
    for i in range(args.steps):
        rows = slice(i * args.batch, (i + 1) * args.batch)
        with curator.step((x[rows], y[rows])) as step:  # hooks ride on this forward
            outputs = model(x[rows])
        loss = step.loss(outputs)  # weighted mean over the kept samples
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        kept += int(step.keep.sum())
        dropped_noisy += int((~step.keep & noisy[rows]).sum())
        n_noisy += int(noisy[rows].sum())
    seen = args.steps * args.batch
    out = {"kept_fraction": kept / seen, "noisy_dropped": dropped_noisy / max(1, n_noisy)}
    print(f"kept {out['kept_fraction']:.0%} of the samples; dropped "
          f"{out['noisy_dropped']:.0%} of the noisy ones")
    return out


if __name__ == "__main__":
    main()
