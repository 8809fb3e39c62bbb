"""The detection figure: when does the value find the noisy labels?

Reads the runs of ``experiments/detection.yaml`` (one folder per run, any number of
datasets) and draws, per dataset, four panels of the noisy-label ROC AUC (of ``-value``;
0.5 = chance) recorded each epoch:

- **per epoch**: the base setting's AUC against the epoch, one line per estimator, and LAI
  runs that curate (``policy=threshold``) from a later epoch, dashed;
- **|V|**: validation samples per refresh (runs refreshed every 10 steps);
- **refresh period**: steps between cache refreshes (|V| = the base's);
- **capacity**: the model (base |V|, refreshed every step).

In the last three a marker is the AUC averaged over the run's epochs and the bar spans its
lowest and highest epoch. The base setting is read from the records: |V| 100, refreshed
every step, the dataset's most common model, ``policy=score_only``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from lai.artifacts.collect import describe_model
from lai.artifacts.paper_values import display

ESTIMATORS = ("lai", "lli", "ghost")
LABELS = {"lai": "LAI", "lli": "LLI", "ghost": "Ghost (exact)"}
COLORS = {"lai": "tab:blue", "lli": "tab:green", "ghost": "tab:orange"}
BASE_V, BASE_REFRESH, V_SWEEP_REFRESH = 100, 1, 10
NEVER = 100_000  # refresh_every at or above this: one refresh for the whole run


def load_detection_runs(root: Path) -> pd.DataFrame:
    """One row per completed run under ``root``: dataset, estimator, policy, start_epoch,
    val_max, refresh_every, model, epochs (list) and auc (list, NaN where not scored)."""
    rows = []
    for path in sorted(Path(root).glob("**/summary.json")):
        summary = json.loads(path.read_text())
        cfg_path = path.parent / "config.yaml"
        if summary.get("status") != "completed" or not cfg_path.is_file():
            continue
        cfg = OmegaConf.load(cfg_path)
        hist = summary.get("history", [])
        rows.append({
            "dataset": cfg.dataset.name, "estimator": cfg.estimator.name,
            "policy": cfg.policy.name, "start_epoch": int(cfg.policy.get("start_epoch", 0)),
            "val_max": cfg.estimator.get("val_max"),
            "refresh_every": int(cfg.estimator.refresh_every),
            "model": describe_model(cfg.model),
            "epochs": [int(r["epoch"]) + 1 for r in hist],
            "auc": [np.nan if r.get("noisy_auc") is None else float(r["noisy_auc"])
                    for r in hist],
            "test_acc": summary.get("final_test_acc"),
            "n_params": summary.get("n_params"),
        })
    return pd.DataFrame(rows)


def _base_model(runs: pd.DataFrame) -> str:
    return runs["model"].mode().iloc[0]


def panels(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The runs of one dataset split by what they vary (see the module docstring)."""
    model = _base_model(runs)
    scored = runs[runs["policy"] == "score_only"]
    return {
        "epoch": scored[(scored["val_max"] == BASE_V)
                        & (scored["refresh_every"] == BASE_REFRESH)
                        & (scored["model"] == model)],
        "curated": runs[runs["policy"] == "threshold"],
        "val_max": scored[(scored["refresh_every"] == V_SWEEP_REFRESH)
                          & (scored["model"] == model)],
        "refresh_every": scored[(scored["val_max"] == BASE_V) & (scored["model"] == model)],
        "model": scored[(scored["val_max"] == BASE_V)
                        & (scored["refresh_every"] == BASE_REFRESH)],
    }


def _params(n: float) -> str:
    return f"{n / 1e6:.1f}M params" if n >= 1e6 else f"{n / 1e3:.0f}k params"


def _summary_points(df: pd.DataFrame, key: str, est: str) -> list[tuple[object, float, float,
                                                                      float]]:
    """``(setting, mean, min, max)`` of the per-epoch AUC for each setting of ``key``."""
    out = []
    for _, r in df[df["estimator"] == est].iterrows():
        auc = np.array(r["auc"], float)
        auc = auc[np.isfinite(auc)]
        if auc.size:
            out.append((r[key], float(auc.mean()), float(auc.min()), float(auc.max())))
    return out


def plot_detection(runs: pd.DataFrame, out_stem: Path, scale_label: str) -> list[Path]:
    """Draw the figure (one row per dataset); write ``out_stem``.png/.pdf; return the paths."""
    # kept whole (~60+ lines): one figure, its panels drawn in order onto shared axes and
    # legends
    if runs.empty:
        raise ValueError("plot_detection: no completed runs")
    datasets = sorted(runs["dataset"].unique(), key=lambda d: (d != "digits_n", d))
    fig = Figure(figsize=(17, 4.2 * len(datasets) + 0.8))
    grid = fig.add_gridspec(len(datasets), 4, hspace=0.55, wspace=0.28, left=0.05,
                            right=0.99, top=1 - 0.9 / (4.2 * len(datasets) + 0.8),
                            bottom=0.09 / len(datasets))
    for row, ds in enumerate(datasets):
        parts = panels(runs[runs["dataset"] == ds])
        ax = fig.add_subplot(grid[row, 0])
        for est in ESTIMATORS:
            for _, r in parts["epoch"][parts["epoch"]["estimator"] == est].iterrows():
                ax.plot(r["epochs"], r["auc"], "-o", ms=3, color=COLORS[est],
                        label=LABELS[est])
        for _, r in parts["curated"].sort_values("start_epoch").iterrows():
            ax.plot(r["epochs"], r["auc"], "--", lw=1.2, color=COLORS[r["estimator"]],
                    alpha=0.45 + 0.5 * r["start_epoch"] / max(1, len(r["epochs"])),
                    label=f"{LABELS[r['estimator']]} curating from epoch {r['start_epoch'] + 1}")
        ax.axhline(0.5, color="k", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{display(ds)}\nnoisy-label AUC")
        ax.set_title("per epoch (|V| 100, refresh every step)", loc="left", fontsize=9.5)
        ax.legend(fontsize=7, loc="best")
        for col, (key, title, xlabel) in enumerate(
                (("val_max", "|V| per refresh (refresh every 10 steps)", "|V|"),
                 ("refresh_every", "refresh period (|V| 100)", "steps between refreshes"),
                 ("model", "capacity (|V| 100, refresh every step)", "model")), start=1):
            ax = fig.add_subplot(grid[row, col])
            sub = parts[key]
            if key == "model":  # smallest model first, its size under its name
                size = dict(zip(sub["model"], sub["n_params"].fillna(0)))
                settings = sorted(size, key=lambda m: size[m])
            else:
                settings = sorted(set(sub[key]))
            pos = {s: i for i, s in enumerate(settings)}
            for k, est in enumerate(ESTIMATORS):
                pts = sorted(_summary_points(sub, key, est), key=lambda p: pos[p[0]])
                if not pts:
                    continue
                x = np.array([pos[p[0]] for p in pts]) + (k - 1) * 0.12
                mean = np.array([p[1] for p in pts])
                err = np.array([[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]])
                ax.errorbar(x, mean, yerr=err, fmt="o-", ms=5, capsize=3, color=COLORS[est],
                            label=LABELS[est])
            ticks = ["never" if key == "refresh_every" and s >= NEVER
                     else f"{s}\n{_params(size[s])}" if key == "model" else str(s)
                     for s in settings]
            ax.set_xticks(range(len(settings)), ticks, fontsize=8)
            ax.axhline(0.5, color="k", lw=0.8, ls=":")
            ax.set_xlabel(xlabel)
            ax.set_title(title, loc="left", fontsize=9.5)
            if col == 1:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle("When does the value find the noisy labels? Noisy-label ROC AUC of -value "
                 f"(0.5 = chance; marker = mean over epochs, bar = range) - {scale_label}",
                 fontsize=10.5)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1], metadata={"CreationDate": None})
    return paths


def detection_scale_label(runs: pd.DataFrame, scale: str) -> str:
    """E.g. ``reduced scale, seed 0: digits_n mlp(hidden=128), cifar10n_worst resnet18``."""
    parts = [f"{display(ds)} {_base_model(g)}" for ds, g in runs.groupby("dataset")]
    return f"{scale} scale, one seed: " + "; ".join(parts)
