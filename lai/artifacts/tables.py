"""Tables 1-4 from run records, each next to the paper's numbers.

Each ``tableN(results)`` returns ``(Table, long_form)``: the displayed table (ours, with its
scale, beside the paper's) and a long-form frame, one number per row, for the CSV. Only
records are read; nothing is trained here. Missing results show as ``-`` with a note.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from lai.artifacts import paper_values as P
from lai.artifacts.collect import find_artifact_runs, scale_note
from lai.artifacts.render import Table, fmt_mean_std, mean_std
from lai.artifacts.table3 import table3, table3_evidence, table3_pooled  # noqa: F401

OURS = "ours†"


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "completed"] if len(df) else df


def _long(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["table", "row", "column", "source", "scale", "mean",
                                       "std", "n"])


# ---- Table 1 -----------------------------------------------------------------------------
def table1(results: Path) -> tuple[Table, pd.DataFrame]:
    """Pile pre-training: perplexity at half / all batches, removed samples, seen/used."""
    df, scale = find_artifact_runs(results, "table1")
    ok = _completed(df)
    long, rows = [], []
    steps = None
    for method in ("vanilla", "lai"):
        g = ok[ok["estimator"] == method] if len(ok) else ok
        cells, vals = [], {}
        if len(g):
            evals = [r for r in g["step_evals"] if isinstance(r, dict)]
            steps = sorted({int(s) for e in evals for s in e}) if evals else []
            if len(steps) >= 2:
                half, end = str(steps[-2]), str(steps[-1])
                vals["ppl_half"] = [e[half]["test_ppl"] for e in evals if half in e]
                vals["ppl_end"] = [e[end]["test_ppl"] for e in evals if end in e]
            vals["removed"] = list(g["samples_removed"])
            vals["sample"] = [s / max(1, s - r) for s, r in zip(g["samples_seen"],
                                                                 g["samples_removed"])]
        for key, digits in (("ppl_half", 4), ("ppl_end", 4), ("removed", 1), ("sample", 4)):
            cells.append(fmt_mean_std(vals.get(key, []), digits=digits))
            m, s, n = mean_std(vals.get(key, []))
            long.append({"table": 1, "row": method, "column": key, "source": "ours",
                         "scale": scale, "mean": m, "std": s, "n": n})
            paper = P.TABLE1[method][key]
            cells.append(f"{paper:,}" if key == "removed" else f"{paper:.6f}" if "ppl" in key
                         else f"{paper:.4f}")
            long.append({"table": 1, "row": method, "column": key, "source": "paper",
                         "scale": "paper", "mean": paper, "std": math.nan, "n": 1})
        rows.append([P.display(method) if method == "lai" else "Baseline", *cells])
    h, e = (steps[-2], steps[-1]) if steps and len(steps) >= 2 else ("?", "?")
    ph, pe = P.TABLE1_STEPS
    header = ["Method", f"ppl @{h} {OURS}", f"ppl @{ph:,} paper", f"ppl @{e} {OURS}",
              f"ppl @{pe:,} paper", f"#removed {OURS}", "#removed paper",
              f"seen/used {OURS}", "seen/used paper"]
    notes = [f"† {scale_note(df, scale)}.",
             "Self-influence curation: the current batch is the validation set; samples with "
             "value < 0 are dropped. Perplexity on held-out text; seen/used = samples seen / "
             "samples trained on (the paper's 'Sample' column)."]
    return Table("Table 1: LLM pre-training on Pile (self-influence LAI)", header, rows,
                 notes), _long(long)


# ---- Table 2 -----------------------------------------------------------------------------
GLUE = ("glue_sst2", "glue_mrpc", "glue_qnli", "glue_rte")


def _samples_per_active_epoch(row: pd.Series) -> float:
    """Mean samples trained on per epoch over the epochs where curation was active."""
    per = list(row["samples_per_epoch"])
    start = int(row.get("start_epoch", 0) or 0)
    active = per[start:] if start < len(per) else per
    return float(np.mean(active))


def table2(results: Path) -> tuple[Table, pd.DataFrame]:
    """GLUE fine-tuning: samples per epoch (curated epochs), validation loss, test accuracy."""
    df, scale = find_artifact_runs(results, "table2")
    ok = _completed(df)
    long, rows = [], []
    for ds in GLUE:
        for method in ("vanilla", "lai"):
            g = ok[(ok["dataset"] == ds) & (ok["estimator"] == method)] if len(ok) else ok
            vals = {"samples": [_samples_per_active_epoch(r) for _, r in g.iterrows()],
                    "val_loss": list(g["final_val_loss"]) if len(g) else [],
                    "test_acc": [a * 100 for a in g["final_test_acc"]] if len(g) else []}
            cells = []
            for key, digits in (("samples", 0), ("val_loss", 4), ("test_acc", 1)):
                cells.append(fmt_mean_std(vals[key], digits=digits))
                m, s, n = mean_std(vals[key])
                long.append({"table": 2, "row": f"{ds}/{method}", "column": key,
                             "source": "ours", "scale": scale, "mean": m, "std": s, "n": n})
                paper = P.TABLE2[method][key][ds]
                cells.append(f"{paper:,}" if key == "samples" else str(paper))
                long.append({"table": 2, "row": f"{ds}/{method}", "column": key,
                             "source": "paper", "scale": "paper", "mean": paper,
                             "std": math.nan, "n": 1})
            rows.append([P.display(ds), P.display(method), *cells])
    header = ["Dataset", "Method", f"samples/epoch {OURS}", "samples/epoch paper",
              f"val loss {OURS}", "val loss paper", f"test acc % {OURS}", "test acc % paper"]
    notes = [f"† {scale_note(df, scale)}.",
             "Vanilla warm-up, then LAI (policy.start_epoch); samples/epoch is the mean over the "
             "curated epochs (all samples for Vanilla). Test = GLUE validation split.",
             "A dataset with no runs (e.g. QNLI: no training split in ../shared/data) shows -."]
    return Table("Table 2: fine-tuning on GLUE (Vanilla warm-up, then LAI)", header, rows,
                 notes), _long(long)


# ---- Table 4 -----------------------------------------------------------------------------
BENCH_SETUPS = (("resnet18", "ResNet-18 / CIFAR shape"), ("bert", "BERT classifier"),
                ("gpt_neo", "GPT-Neo causal LM"))
T4_METHODS = ("vanilla", "ghost", "lli", "lai")


def _bench_files(results: Path) -> list[dict]:
    """``make bench`` reports: the default sizes (``online_cuda.json``, ``online_cpu.json``)
    first, then any other size (``online_<device>_<size>.json``)."""
    folder = Path(results) / "bench"
    paths = [folder / "online_cuda.json", folder / "online_cpu.json",
             *sorted(folder.glob("online_*_*.json"))]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def _param_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _bench_notes(bench: dict) -> list[str]:
    """Notes a bench JSON calls for: its speed settings, rows whose counts had to be taken
    with autocast off, and (on a GPU) how much of a vanilla step the GPU was busy."""
    device, out = bench.get("device", "?"), []
    speed = bench.get("speed")
    if speed:
        out.append(f"{device}: precision {speed.get('precision')}, channels-last "
                   f"{speed.get('channels_last')}, compile {speed.get('compile')}.")
    refit = [f"{key}/{m}" for key, rows in bench.get("setups", {}).items()
             for m, r in rows.items() if "gflop" in (r.get("count_notes") or {})]
    if refit:
        out.append(f"{device}: the GFLOP of {', '.join(refit)} were counted on a step with "
                   "autocast off (the bf16 step failed inside PyTorch's FlopCounterMode; FLOPs "
                   "depend on shapes only); see count_notes in the JSON.")
    busy = [f"{label} {r['gpu_busy_ms'] / r['step_ms']:.0%}"
            for key, label in BENCH_SETUPS
            if (r := bench.get("setups", {}).get(key, {}).get("vanilla", {})).get("gpu_busy_ms")]
    if busy:
        out.append(f"{device}: the GPU was busy for this share of a vanilla step: "
                   f"{', '.join(busy)}; where it is low the step is bound by the host's "
                   "dispatch, and the step-time ratios measure the host work each method adds "
                   "(gpu_busy_ratio in the JSON: the GPU time alone).")
    return out


def table4(results: Path) -> tuple[Table, pd.DataFrame]:
    """GFLOP per batch and peak memory of Vanilla/Ghost/LLI/LAI from ``make bench`` JSON
    (ratios to Vanilla in parentheses), beside the paper's Table 4."""
    # kept whole (~60+ lines): one table, each row's cells built beside the paper's in one pass
    long, rows = [], []
    benches = _bench_files(results)
    for bench in benches:
        device = bench.get("device", "?")
        for key, label in BENCH_SETUPS:
            setup = bench["setups"].get(key)
            if not setup:
                continue
            batch = setup["vanilla"].get("batch")
            model = setup["vanilla"].get("model")  # recorded since the bench's --size option
            size = f"{_param_count(model['params'])} params, " if model else ""
            for method in T4_METHODS:
                m = setup.get(method)
                if m is None:
                    continue
                mem = m.get("peak_mem_mb")
                name = P.display(method)
                if m.get("ghost_form"):  # which of Ghost's two exact forms the trainer picked
                    name = f"{name} ({m['ghost_form']} form)"
                rows.append([f"ours: {device}", f"{label} ({size}batch {batch})", name,
                             "n/a" if m.get("gflop") is None else
                             f"{m['gflop']:.2f} (×{m['gflop_ratio']:.2f})",
                             "n/a" if mem is None else
                             f"{mem:,.0f} (×{m['mem_ratio']:.2f})",
                             f"×{m['time_ratio']:.2f}"])
                for col, val in (("gflop", m.get("gflop")), ("memory_mb", mem),
                                 ("step_time_ratio", m["time_ratio"])):
                    long.append({"table": 4, "row": f"{key}/{method}", "column": col,
                                 "source": "ours", "scale": device,
                                 "mean": math.nan if val is None else val, "std": math.nan,
                                 "n": bench.get("steps")})
    for k, ds in enumerate(P.TABLE4_DATASETS):
        for method in T4_METHODS:
            g, mem = P.TABLE4[method]["gflop"][k], P.TABLE4[method]["memory"][k]
            g0, m0 = P.TABLE4["vanilla"]["gflop"][k], P.TABLE4["vanilla"]["memory"][k]
            rows.append(["paper", P.display(ds), P.display(method), f"{g:.2f} (×{g / g0:.2f})",
                         f"{mem:,.0f} (×{mem / m0:.2f})", "-"])
            long.append({"table": 4, "row": f"{ds}/{method}", "column": "gflop",
                         "source": "paper", "scale": "paper", "mean": g, "std": math.nan, "n": 1})
            long.append({"table": 4, "row": f"{ds}/{method}", "column": "memory_mb",
                         "source": "paper", "scale": "paper", "mean": mem, "std": math.nan,
                         "n": 1})
    header = ["Source", "Setting", "Method", "GFLOP / batch (×vanilla)",
              "peak memory MB (×vanilla)", "step time ×vanilla"]
    notes = ["Ours: `make bench` (scripts/bench_online.py), one process per device, FLOPs from "
             "torch.utils.flop_counter, one step = forward + valuation + backward + update; "
             "the validation-cache refresh is reported separately in results/bench/*.json.",
             "GPU rows use the paper's model sizes (ResNet-18 batch 512, bert-base, "
             "gpt-neo-125M); CPU rows use tiny presets (and, from online_cpu_small.json, the "
             "all-MiniLM-L6 shape), so their GFLOP are not comparable with the paper's. The "
             "Setting column gives the parameter count of the model that ran.",
             "Peak memory: the CUDA allocator's peak on a GPU; on a CPU the peak of live tensor "
             "storage (lai.bench.memory.PeakTensorMemory: no allocator rounding, caching or "
             "kernel workspaces), everything alive at the step's start included.",
             "Ghost runs score-only here (every sample kept): its probe form (values from the "
             "training backward) where that is exact per sample, its forward-mode form on "
             "models with train-mode BatchNorm."]
    if not benches:
        notes.append("No results/bench/online_*.json found: run `make bench`.")
    for b in benches:  # two files of one device can call for the same note: once each
        notes.extend(n for n in _bench_notes(b) if n not in notes)
    for b in benches:  # GPU runs made before the bench recorded the model it built
        neo = b.get("setups", {}).get("gpt_neo", {}).get("vanilla")
        if neo and "size" not in b and not str(b.get("device", "cpu")).startswith("cpu"):
            notes.append(f"The {b['device']} run predates the bench's record of the model it "
                         "built: its GPT-Neo rows came from GPTNeoConfig's defaults, the 1.3B "
                         f"shape (24 layers, width 2048: {neo['gflop'] / 1e3:.1f} TFLOP per "
                         f"batch of {neo.get('batch')}), not gpt-neo-125M as the script then "
                         "said. The script now builds 125M at --size full.")
    return Table("Table 4: cost of online valuation per batch", header, rows, notes), _long(long)


TABLES = {"table1": table1, "table2": table2, "table3": table3,
          "table3_evidence": table3_evidence, "table3_pooled": table3_pooled,
          "table4": table4}
