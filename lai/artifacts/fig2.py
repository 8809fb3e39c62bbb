"""Figure 2: per-sample LAI dynamics on CIFAR-10N-worst, from a run with ``save_scores=true``.

A: where the clean and the noisy samples' scores rank within each epoch, and the epoch's
noisy-label AUC; B: inclusion heat-map, samples x epochs (kept / dropped), clean labels above
noisy ones; C: three samples' ranks across epochs. Reads only
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


def epoch_percentiles(values: np.ndarray) -> np.ndarray:
    """``[E, N]``: each sample's score as its percentile rank among the samples scored in the
    same epoch (0 = lowest value, 100 = highest; NaN where not scored). Scores change scale
    by orders of magnitude over training; ranks keep every epoch comparable, and the clean
    and noisy samples' ranks show directly whether the score tells them apart."""
    from scipy.stats import rankdata

    out = np.full(values.shape, np.nan)
    for e, v in enumerate(values):
        fin = np.isfinite(v)
        if fin.sum() > 1:
            out[e, fin] = (rankdata(v[fin]) - 1) / (fin.sum() - 1) * 100
    return out


def _epoch_auc(values: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    from lai.train.noisy import detection_metrics

    out = []
    for v in values:
        m = detection_metrics(v, np.where(np.isfinite(v), 1, -1), noisy)["noisy_auc"]
        out.append(np.nan if m is None else m)
    return np.array(out)


def plot_fig2(run_dir: Path, out_stem: Path, scale_label: str, n_heat: int = 300,
              seed: int = 0) -> list[Path]:
    """Draw Figure 2 from one run folder; writes ``out_stem``.png/.pdf and returns the paths.

    A: per epoch, the median and interquartile range of the clean and the noisy samples'
    within-epoch score percentiles (:func:`epoch_percentiles`), with the noisy-label AUC of
    that epoch on the right axis; B: inclusion heat-map of random samples, clean labels above
    the noisy ones; C: three samples' percentiles across epochs."""
    # kept whole (~60+ lines): one figure, its panels drawn in order onto shared axes and
    # legends
    data = load_scores(run_dir)
    values, kept, noisy = data["values"], data["kept"], data["noisy"]
    epochs = np.arange(1, values.shape[0] + 1)
    pct = epoch_percentiles(values)
    fig = plt.figure(figsize=(15, 5.2), constrained_layout=True)
    gs = fig.add_gridspec(1, 3, width_ratios=[1.2, 1.0, 1.0])

    # A: where clean and noisy samples rank within each epoch
    ax = fig.add_subplot(gs[0])
    groups = [("clean labels", ~noisy, "tab:blue"), ("noisy labels", noisy, "tab:red")] \
        if noisy is not None else [("all samples", np.ones(values.shape[1], bool), "tab:blue")]
    for name, mask, color in groups:
        sub = pct[:, mask]
        with np.errstate(all="ignore"):
            q25, q50, q75 = (np.nanpercentile(sub, q, axis=1) for q in (25, 50, 75))
        ax.fill_between(epochs, q25, q75, color=color, alpha=0.2, lw=0)
        ax.plot(epochs, q50, "-o", ms=3, color=color, label=f"{name}: median, 25-75%")
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.set_ylim(0, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("rank of the LAI score within its epoch (percentile)")
    ax.set_title("A  clean vs noisy labels: where their scores rank", loc="left", fontsize=10)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if noisy is not None:
        twin = ax.twinx()
        twin.plot(epochs, _epoch_auc(values, noisy), color="k", lw=1.4,
                  label="noisy-label AUC (right axis)")
        twin.set_ylim(0.3, 1.0)
        twin.set_ylabel("noisy-label AUC of -score (0.5 = chance)")
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower center",
                  bbox_to_anchor=(0.5, 1.06), ncol=2, fontsize=8, frameon=False)
    else:
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), fontsize=8, frameon=False)

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
        ax.axhline(n_clean, color="tab:red", lw=1.5)
        rate = {g: float(np.mean(kept[:, cols][:, sel][kept[:, cols][:, sel] >= 0] == 1))
                for g, sel in (("clean", ~noisy[cols]), ("noisy", noisy[cols]))}
        ax.set_yticks([n_clean / 2, (n_clean + len(cols)) / 2],
                      [f"clean\n{n_clean} samples\nkept {rate['clean']:.0%}",
                       f"noisy\n{len(cols) - n_clean} samples\nkept {rate['noisy']:.0%}"],
                      fontsize=8)
    else:
        ax.set_ylabel(f"{len(cols)} random training samples")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title("B  inclusion of random samples (blue = kept)", loc="left", fontsize=10)

    # C: three samples across epochs, as percentiles (a linear, comparable scale)
    ax = fig.add_subplot(gs[2])
    for (i, label), color in zip(pick_examples(values, kept, noisy),
                                 ("tab:green", "tab:red", "tab:purple")):
        ax.plot(epochs, pct[:, i], marker="o", ms=3, color=color, label=label)
    ax.axhline(50, color="k", lw=0.8, ls="--")
    ax.set_ylim(0, 100)
    ax.set_xlabel("epoch")
    ax.set_ylabel("rank of its LAI score within the epoch (percentile)")
    ax.set_title("C  three samples across epochs", loc="left", fontsize=10)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.06), frameon=False)

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
