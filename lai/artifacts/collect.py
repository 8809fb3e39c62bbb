"""Read run records (``summary.json`` + ``config.yaml``) into a DataFrame for the tables.

The results of an artifact live in ``<results>/<scale>/<artifact>/`` with ``scale`` one of
``paper`` (a cluster run) or ``reduced`` (the CPU-sized runs committed with the project);
``find_artifact_runs`` prefers the paper scale when it has completed runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

SCALES = ("paper", "reduced")


def load_runs(root: Path) -> pd.DataFrame:
    """One row per run folder under ``root`` (any depth): the summary's scalar fields, plus
    ``run_dir``, ``method`` (the method folder's name when the summary has none), the
    summary's lists/dicts as objects, and from the config ``epochs``,
    ``start_epoch``, ``model_desc`` (model name + its size options). Empty frame if none."""
    rows = []
    for path in sorted(Path(root).glob("**/summary.json")):
        summary = json.loads(path.read_text())
        row = dict(summary)
        row["run_dir"] = str(path.parent)
        # the method folder (estimator, run_name, or random-<match> for a control)
        row.setdefault("method", path.parent.parent.name)
        cfg_path = path.parent / "config.yaml"
        if cfg_path.is_file():
            cfg = OmegaConf.load(cfg_path)
            row["cfg_epochs"] = cfg.trainer.epochs
            row["cfg_max_steps"] = cfg.trainer.get("max_steps")
            row["start_epoch"] = cfg.policy.get("start_epoch", 0)
            row["model_desc"] = describe_model(cfg.model)
            row.setdefault("dataset", cfg.dataset.name)
            row.setdefault("estimator", cfg.estimator.name)
            row.setdefault("seed", cfg.seed)
        rows.append(row)
    return pd.DataFrame(rows)


def describe_model(model_cfg) -> str:
    """A short model label from its config, e.g. ``small_cnn(hidden=16)``, ``bert(minilm, 2 layers)``."""
    name = model_cfg.name
    if name in ("small_cnn", "mlp", "tiny_transformer"):
        return f"{name}(hidden={model_cfg.hidden})"
    if name in ("bert", "gpt_neo"):
        src = model_cfg.get("name_or_path") or model_cfg.get("preset") or "tiny"
        layers = model_cfg.get("num_layers")
        return f"{name}({src}{f', {layers} layers' if layers else ''})"
    if name == "resnet18":
        return f"resnet18({model_cfg.get('stem', 'imagenet')} stem)"
    return str(name)


def latest_per_job(df: pd.DataFrame) -> pd.DataFrame:
    """One record per (dataset, method, seed): a re-run of the same job (e.g. after the
    committed records, or a failed try then a good one) replaces the older record. Completed
    records win over failed ones; among equals the newest summary wins."""
    if df.empty:
        return df
    key = [c for c in ("dataset", "method", "seed") if c in df]
    mtime = df["run_dir"].map(lambda d: (Path(d) / "summary.json").stat().st_mtime)
    order = df.assign(_ok=df["status"] == "completed", _t=mtime)
    order = order.sort_values(["_ok", "_t"]).groupby(key, as_index=False).tail(1)
    return order.drop(columns=["_ok", "_t"]).sort_index()


def find_artifact_runs(results: Path, artifact: str) -> tuple[pd.DataFrame, str | None]:
    """Runs of ``artifact`` (the latest per job, see ``latest_per_job``) and the scale they
    come from (None when there are none). Failed runs stay in the frame (``status`` !=
    completed) so a table can show OOM."""
    for scale in SCALES:
        df = load_runs(Path(results) / scale / artifact)
        if len(df) and (df.get("status") == "completed").any():
            return latest_per_job(df), scale
    return pd.DataFrame(), None


def scale_note(df: pd.DataFrame, scale: str | None) -> str:
    """One line saying where the numbers come from, e.g. ``reduced scale: small_cnn(hidden=16),
    1,800 training samples, 8 epochs, seeds 0-2``; built from the records, never typed in."""
    if scale is None or df.empty:
        return "no runs found"
    ok = df[df["status"] == "completed"]
    parts = []
    for (ds,), g in ok.groupby(["dataset"]):
        models = ", ".join(sorted(set(g["model_desc"].dropna()))) if "model_desc" in g else "?"
        n = sorted(set(int(x) for x in g["n_train"].dropna())) if "n_train" in g else []
        n_txt = "/".join(f"{x:,}" for x in n)
        if g["cfg_max_steps"].notna().any():
            length = f"{int(g['cfg_max_steps'].max()):,} steps"
        else:
            length = f"{int(g['cfg_epochs'].max())} epochs"
        seeds = sorted(set(int(s) for s in g["seed"]))
        parts.append(f"{ds}: {models}, {n_txt} train, {length}, {len(seeds)} seed(s)")
    return f"{scale} scale - " + "; ".join(parts)
