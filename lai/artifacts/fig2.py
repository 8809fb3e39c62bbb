"""Figure 2: per-sample LAI dynamics on CIFAR-10N-worst, from a run with ``save_scores=true``.

A: the distribution of scores per epoch (clean and noisy labels apart); B: inclusion heat-map,
samples x epochs (kept / dropped); C: three samples' scores across epochs. Reads only
``scores/epoch_XXX.npz`` (+ ``noisy.npy``) and ``summary.json`` of one run folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402,F401  (MaxNLocator)
import numpy as np  # noqa: E402

from lai.artifacts.collect import describe_model  # noqa: E402
from lai.artifacts.paper_values import display  # noqa: E402


def load_scores(run_dir: Path) -> dict:
    """``{"values": [E, N] float, "kept": [E, N] int8 (1 kept, 0 dropped, -1 unseen),
    "noisy": [N] bool or None}`` for the N training samples over E epochs."""
    files = sorted((Path(run_dir) / "scores").glob("epoch_*.npz"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/scores has no epoch_*.npz (run with save_scores=true)")
    values = np.stack([np.load(f)["values"] for f in files])
    kept = np.stack([np.load(f)["kept"] for f in files])
    noisy_path = Path(run_dir) / "scores" / "noisy.npy"
    noisy = np.load(noisy_path) if noisy_path.is_file() else None
    return {"values": values, "kept": kept, "noisy": noisy}


def pick_examples(values: np.ndarray, kept: np.ndarray, noisy: np.ndarray | None) -> list[tuple[int, str]]:
    """Three sample indices for panel C: a clean sample kept the most often, a noisy sample
    dropped the most often, and the sample whose keep decision flips the most."""
    seen = (kept >= 0).all(axis=0) & np.isfinite(values).all(axis=0)
    idx = np.flatnonzero(seen)
    keep_rate = (kept[:, idx] == 1).mean(axis=0)
    flips = (np.diff(kept[:, idx], axis=0) != 0).sum(axis=0)
    clean = idx if noisy is None else idx[~noisy[idx]]
    dirty = idx if noisy is None else idx[noisy[idx]]
    rate_of = dict(zip(idx.tolist(), keep_rate.tolist()))
    a = max(clean, key=lambda i: rate_of[i]) if len(clean) else idx[0]
    b = min(dirty, key=lambda i: rate_of[i]) if len(dirty) else idx[-1]
    c = int(idx[np.argmax(flips)])
    tag = (lambda i: "" if noisy is None else (" (noisy label)" if noisy[i] else " (clean label)"))
    return [(int(a), f"sample {a}{tag(a)}: mostly kept"), (int(b), f"sample {b}{tag(b)}: mostly dropped"),
            (c, f"sample {c}{tag(c)}: keep decision flips")]


def plot_fig2(run_dir: Path, out_stem: Path, scale_label: str, n_heat: int = 300,
              seed: int = 0) -> list[Path]:
    """Draw Figure 2 from one run folder; writes ``out_stem``.png/.pdf and returns the paths."""
    data = load_scores(run_dir)
    values, kept, noisy = data["values"], data["kept"], data["noisy"]
    epochs = np.arange(1, values.shape[0] + 1)
    fig = plt.figure(figsize=(15, 4.6), constrained_layout=True)
    gs = fig.add_gridspec(1, 3, width_ratios=[1.25, 1.0, 1.0])

    # A: per-epoch distributions, clean vs noisy labels. Scores shrink and grow by orders of
    # magnitude over training, so each epoch is divided by its own standard deviation (the
    # shapes and the clean/noisy gap stay comparable) and clipped to its 1st-99th percentile.
    ax = fig.add_subplot(gs[0])
    groups = [("clean", ~noisy, "tab:blue"), ("noisy", noisy, "tab:red")] if noisy is not None \
        else [("all", np.ones(values.shape[1], bool), "tab:blue")]
    scaled = np.full_like(values, np.nan)
    for e, v in enumerate(values):
        fin = np.isfinite(v)
        if fin.sum() > 1:
            lo, hi = np.percentile(v[fin], [1, 99])
            scaled[e, fin] = np.clip(v[fin], lo, hi) / max(float(np.std(v[fin])), 1e-30)
    width = 0.8 / len(groups)
    for k, (name, mask, color) in enumerate(groups):
        pos = epochs + (k - (len(groups) - 1) / 2) * width
        data_k = [v[mask & np.isfinite(v)] for v in scaled]
        data_k = [d if d.size else np.array([np.nan]) for d in data_k]
        parts = ax.violinplot(data_k, positions=pos, widths=width, showmedians=True,
                              showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(color)
            body.set_alpha(0.5)
        parts["cmedians"].set_color(color)
        ax.plot([], [], color=color, lw=6, alpha=0.5, label=f"{name} labels")
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("LAI score / that epoch's std (1st-99th pct.)")
    ax.set_title("A  score distribution per epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(loc="lower left", fontsize=8)

    # B: inclusion heat-map for a random subset of samples, noisy ones at the bottom
    ax = fig.add_subplot(gs[1])
    rng = np.random.default_rng(seed)
    cols = rng.choice(values.shape[1], size=min(n_heat, values.shape[1]), replace=False)
    if noisy is not None:
        cols = cols[np.argsort(noisy[cols], kind="stable")]
    heat = np.where(kept[:, cols] < 0, np.nan, kept[:, cols]).T.astype(float)
    cmap = matplotlib.colors.ListedColormap(["white", "tab:blue"])
    ax.imshow(heat, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest",
              extent=(0.5, len(epochs) + 0.5, len(cols), 0))
    if noisy is not None:
        n_clean = int((~noisy[cols]).sum())
        ax.axhline(n_clean, color="tab:red", lw=1.2)
        ax.text(len(epochs) + 0.4, n_clean + 2, "noisy labels below", color="tab:red",
                fontsize=8, ha="right", va="top")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f"{len(cols)} random training samples")
    ax.set_title("B  inclusion (blue = kept in its batch)")

    # C: three samples across epochs
    ax = fig.add_subplot(gs[2])
    for (i, label), color in zip(pick_examples(values, kept, noisy),
                                 ("tab:green", "tab:red", "tab:purple")):
        ax.plot(epochs, values[:, i], marker="o", ms=3, color=color, label=label)
    ax.axhline(0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("LAI score")
    ax.set_yscale("symlog", linthresh=float(np.nanmedian(np.abs(values))) or 1.0)
    ax.set_title("C  three samples across epochs (symlog)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="best")

    summary_path = Path(run_dir) / "summary.json"
    dataset = json.loads(summary_path.read_text()).get("dataset", "?") \
        if summary_path.is_file() else "?"
    fig.suptitle(f"Figure 2: LAI dynamics on {display(dataset)} - {scale_label}", fontsize=11)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # reproducible bytes: no timestamp
    plt.close(fig)
    return paths


def fig2_scale_label(run_dir: Path, scale: str) -> str:
    """E.g. ``reduced scale: small_cnn(hidden=16), 1,800 training images, 20 epochs, seed 0``."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
    return (f"{scale} scale: {describe_model(cfg.model)}, {summary.get('n_train', '?'):,} training "
            f"images, {summary.get('epochs', '?')} epochs, seed {summary.get('seed', '?')}")
