"""Figure 1 of the paper (§5.1): fidelity of the proxies against the Monte-Carlo Shapley
reference, drawn from the JSON that ``scripts/fidelity.py`` writes.

Layout as in the paper: **A-D** proxy value vs Shapley value of the 16 samples at four
checkpoints (25/50/75/100% of training), LAI blue, Ghost orange, LLI green, with dashed
least-squares fits (and, when the JSON has it, the paper code's flattened Ghost in red);
**E** the per-checkpoint Pearson correlation vs step; **F** violins of
those correlations with dashed mean lines, and the paper's mean ± std beside ours.

Proxies and Shapley values live on different scales (LAI is not in Ghost's units), so the
scatter panels z-score every vector per checkpoint; the fitted slope is then Pearson's r.
Figures are drawn on matplotlib's Agg canvas (no display, no global backend switch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lai.artifacts.paper_values import FIG1  # the paper's values, when the JSON has none
from lai.fidelity.shapley import pearson

PROXIES = ("lai", "ghost", "lli", "ghost_flat")
LABELS = {"lai": "LAI", "ghost": "Ghost", "lli": "LLI", "ghost_flat": "Ghost (paper code)"}
COLORS = {"lai": "tab:blue", "ghost": "tab:orange", "lli": "tab:green",
          "ghost_flat": "tab:red"}


def _z(x) -> np.ndarray:
    x = np.asarray(x, float)
    s = x.std()
    return (x - x.mean()) / s if s > 0 else np.zeros_like(x)


def _checkpoint_r(row: dict, proxy: str) -> float:
    stored = (row.get("pearson") or {}).get(proxy)
    return float(stored) if stored is not None else pearson(row[proxy], row["shapley"])


def describe_scale(fidelity: dict) -> str:
    """One line naming the scale and settings, e.g. ``reduced: tiny GPT-Neo (2 layers, hidden
    32), 1,000 steps, 200 permutations``; built from the JSON, never typed in."""
    s = fidelity.get("settings", {})
    m = s.get("model", {})
    rows = fidelity.get("checkpoints", [])
    if m.get("name_or_path"):
        model = f"{m['name_or_path']}"
    elif m.get("preset"):
        model = f"{m['preset']} GPT-Neo"
    else:
        model = "GPT-Neo"
    if m.get("layers") and m.get("hidden"):
        model += f" ({m['layers']} layers, hidden {m['hidden']})"
    steps = s.get("steps", max((r["step"] for r in rows), default=0))
    parts = [f"{fidelity.get('scale', 'unknown scale')}: {model}", f"{steps:,} steps"]
    if s.get("permutations"):
        parts.append(f"{s['permutations']:,} permutations")
    parts.append(f"{len(rows)} checkpoints")
    if s.get("lr") is not None:
        parts.append(f"game lr {s['lr']:g}")
    if s.get("val_size"):
        parts.append(f"|V| = {s['val_size']}")
    if (s.get("data") or {}).get("standin"):
        parts.append("Pile stand-in corpus")
    return ", ".join(parts)


def _snapshots(rows: list[dict], total: int) -> list[dict]:
    """The checkpoints nearest to 25/50/75/100% of ``total`` steps (distinct, in order)."""
    picked: list[dict] = []
    for q in (0.25, 0.5, 0.75, 1.0):
        best = min(rows, key=lambda r: (abs(r["step"] - q * total), r["step"]))
        if best not in picked:
            picked.append(best)
    return picked


def plot_fig1(fidelity: dict, out_stem: Path) -> list[Path]:
    """Draw Figure 1 from a ``fidelity.json`` dict; write ``<out_stem>.png`` (150 dpi) and
    ``<out_stem>.pdf``; return their paths.

    Needs ``checkpoints``: a list of ``{"step", "shapley": [B], <proxy>: [B], "pearson":
    {<proxy>: r}}`` (``pearson`` is recomputed when absent) for the proxies present among
    LAI, Ghost, LLI and the flattened Ghost; ``settings``/``summary``/``paper``/``scale`` are
    used when present.
    """
    # kept whole (~60+ lines): one figure, its panels drawn in order onto shared axes and
    # legends
    rows = sorted(fidelity.get("checkpoints", []), key=lambda r: r["step"])
    if not rows:
        raise ValueError("plot_fig1: the fidelity dict has no checkpoints")
    proxies = [m for m in PROXIES if all(m in r for r in rows)]
    if not proxies:
        raise ValueError(f"plot_fig1: no proxy among {PROXIES} in every checkpoint")
    total = fidelity.get("settings", {}).get("steps") or rows[-1]["step"]
    steps = np.array([r["step"] for r in rows])
    corr = {m: np.array([_checkpoint_r(r, m) for r in rows]) for m in proxies}
    paper = fidelity.get("paper") or FIG1

    fig = Figure(figsize=(15, 8.6))
    grid = fig.add_gridspec(2, 4, height_ratios=(1, 1.05), hspace=0.42, wspace=0.28,
                            left=0.05, right=0.985, top=0.835, bottom=0.07)

    # A-D: z-scored proxy vs z-scored Shapley at four checkpoints
    snaps = _snapshots(rows, total)
    for k in range(4):
        ax = fig.add_subplot(grid[0, k])
        if k >= len(snaps):
            ax.set_axis_off()
            continue
        row = snaps[k]
        x = _z(row["shapley"])
        span = np.linspace(x.min() - 0.2, x.max() + 0.2, 2) if len(x) else np.zeros(2)
        for m in proxies:
            y = _z(row[m])
            r = _checkpoint_r(row, m)
            ax.scatter(x, y, s=18, color=COLORS[m], alpha=0.75, edgecolor="none",
                       label=f"{LABELS[m]} (r = {r:.3f})")
            if len(x) > 1 and x.std() > 0:
                slope, icpt = np.polyfit(x, y, 1)
                ax.plot(span, slope * span + icpt, "--", color=COLORS[m], lw=1.2)
        ax.set_title(f"{'ABCD'[k]}   step {row['step']:,} ({row['step'] / total:.0%})",
                     loc="left", fontsize=10, fontweight="bold")
        ax.set_xlabel("Shapley value (z-score per checkpoint)", fontsize=8.5)
        if k == 0:
            ax.set_ylabel("proxy value (z-score per checkpoint)", fontsize=8.5)
        ax.legend(fontsize=7.5, loc="upper left", frameon=False, handletextpad=0.2)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)

    # E: Pearson correlation per checkpoint
    ax = fig.add_subplot(grid[1, :3])
    for m in proxies:
        ax.plot(steps, corr[m], "-o", ms=3, lw=1.3, color=COLORS[m], label=LABELS[m])
    ax.set_title("E   per-checkpoint Pearson correlation with the Shapley reference",
                 loc="left", fontsize=10, fontweight="bold")
    ax.set_xlabel("training step")
    ax.set_ylabel("Pearson r")
    # E and F share a y range that holds every correlation and the paper's mean - std
    finite = np.concatenate([c[np.isfinite(c)] for c in corr.values()]
                            + [np.array([paper[m]["mean"] - paper[m]["std"]])
                               for m in proxies if m in paper])
    low = float(finite.min()) if len(finite) else 0.0
    low = low - 0.05 * max(1.0 - low, 0.2)
    ax.set_ylim(low, 1.01)
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8.5, loc="lower left", ncol=len(proxies))

    # F: violins of the per-checkpoint correlations, dashed means, the paper's mean +- std
    ax = fig.add_subplot(grid[1, 3])
    for i, m in enumerate(proxies, start=1):
        c = corr[m][np.isfinite(corr[m])]
        if len(c) > 1 and c.std() > 0:
            parts = ax.violinplot([c], positions=[i], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(COLORS[m])
                body.set_alpha(0.45)
        ax.scatter(np.full(len(c), i) + np.linspace(-0.08, 0.08, len(c)), c, s=6,
                   color=COLORS[m], zorder=3)
        if len(c):
            ax.hlines(c.mean(), i - 0.4, i + 0.4, colors=COLORS[m], linestyles="--", lw=1.6)
        if m in paper:
            ax.errorbar(i + 0.42, paper[m]["mean"], yerr=paper[m]["std"], fmt="D", ms=4,
                        color="black", capsize=3, lw=1,
                        label="paper mean ± std" if m == "lai" else None)
    ax.set_xticks(range(1, len(proxies) + 1), [LABELS[m].replace(" (", "\n(") for m in proxies],
                  fontsize=8)
    ax.set_ylim(low, 1.01)
    ax.set_title("F   distribution over checkpoints", loc="left", fontsize=10,
                 fontweight="bold")
    ax.set_ylabel("Pearson r")
    ax.grid(alpha=0.25, axis="y")
    if any(m in paper for m in proxies):
        ax.legend(fontsize=7.5, loc="lower left", frameon=False)

    # title: the scale, and our mean +- std beside the paper's
    ours = []
    for m in proxies:
        c = corr[m][np.isfinite(corr[m])]
        std = c.std(ddof=1) if len(c) > 1 else float("nan")
        ours.append(f"{LABELS[m]} {c.mean():.4f} ± {std:.4f}" if len(c) else
                    f"{LABELS[m]} n/a")
    theirs = [f"{LABELS[m]} {paper[m]['mean']:.4f} ± {paper[m]['std']:.4f}"
              for m in PROXIES if m in paper]
    fig.suptitle("Figure 1: fidelity of LAI / Ghost / LLI to the Monte-Carlo Shapley value "
                 "(one-SGD-step game)", fontsize=12.5, fontweight="bold", y=0.985)
    fig.text(0.5, 0.94, describe_scale(fidelity), ha="center", fontsize=9.5)
    fig.text(0.5, 0.912, "Pearson r over checkpoints, mean ± std (std ddof 1):  this run: "
             + ", ".join(ours), ha="center", fontsize=9.5)
    fig.text(0.5, 0.886, "paper (GPT-Neo-125M, 10,000 steps, 100 checkpoints, 1,000 "
             "permutations): " + ", ".join(theirs), ha="center", fontsize=9.5, color="0.3")

    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.parent / f"{out_stem.name}.png", out_stem.parent / f"{out_stem.name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # reproducible bytes: no timestamp
    return paths
