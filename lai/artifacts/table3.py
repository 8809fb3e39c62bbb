"""Table 3 (accuracy under label noise) and its evidence table, from run records.

``table3``: test accuracy, mean ± std over seeds, ours beside the paper's, with each online
method's random-drop control (``policy=random`` matched to it, folder ``random-<method>``) in
the row below it.

``table3_evidence``: one row per (dataset, method): accuracy, the paired difference to
Vanilla and to the method's matched control (same seed = same data order and init; mean ± std
of the per-seed differences and how many seeds it won), the kept fraction, and how well the
method's values found the noisy labels (ROC AUC of ``-value``, drop precision and recall,
pooled over every scored sample and epoch; a static method's over its one scoring). The notes
say how far Vanilla memorised the noisy labels (its last epoch's training loss on them).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lai.artifacts import paper_values as P
from lai.artifacts.collect import find_artifact_runs, scale_note
from lai.artifacts.render import Table, fmt_mean_std, mean_std

OURS = "ours†"
ONLINE_WITH_CONTROL = ("ghost", "lli", "lai")


def control_of(method: str) -> str:
    """The folder name of ``method``'s matched random-drop control."""
    return f"random-{method}"


def method_rows() -> list[str]:
    """Table 3's methods in the paper's order, each online method followed by its control."""
    rows = []
    for m in P.TABLE3_METHODS:
        rows.append(m)
        if m in ONLINE_WITH_CONTROL:
            rows.append(control_of(m))
    return rows


def label(method: str) -> str:
    """Display name: ``lai`` -> LAI, ``lai-w3`` -> LAI (after 3 vanilla epochs),
    ``random-lai`` -> Random drop (matched to LAI)."""
    if method.startswith("random-"):
        return f"Random drop (matched to {label(method[len('random-'):])})"
    match = re.fullmatch(r"(.+)-w(\d+)", method)
    if match:
        return f"{P.display(match.group(1))} (after {match.group(2)} vanilla epochs)"
    return P.display(method)


def evidence_rows(methods: set[str]) -> list[str]:
    """Table 3's methods (:func:`method_rows`), then any other method with records (e.g. a
    warm-up variant ``lai-w3``), each followed by its control when it has one."""
    rows = [m for m in method_rows() if m in methods]
    for m in sorted(methods - set(rows)):
        if m.startswith("random-"):
            continue
        rows.append(m)
        if control_of(m) in methods:
            rows.append(control_of(m))
    rows += sorted(m for m in methods - set(rows))  # controls of nothing recorded
    return rows


def table3_runs(results: Path) -> tuple[pd.DataFrame, str | None]:
    """The runs of Table 3: the image sets (artifact ``table3``) and the text sets
    (``table3_text``), each from its preferred scale; the scale label joins both."""
    frames, scales = [], []
    for artifact in ("table3", "table3_text"):
        df, scale = find_artifact_runs(results, artifact)
        if scale is not None:
            frames.append(df)
            scales.append(scale)
    if not frames:
        return pd.DataFrame(), None
    return pd.concat(frames, ignore_index=True), "/".join(dict.fromkeys(scales))


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "completed"] if len(df) else df


def _by_seed(ok: pd.DataFrame, ds: str, method: str, column: str) -> dict[int, float]:
    if not len(ok):
        return {}
    g = ok[(ok["dataset"] == ds) & (ok["method"] == method)]
    return {int(s): float(v) for s, v in zip(g["seed"], g[column])
            if v is not None and not (isinstance(v, float) and math.isnan(v))}


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[list[float], int]:
    """``(a[s] - b[s] for the seeds in both, how many are > 0)``."""
    diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    return diffs, sum(d > 0 for d in diffs)


def fmt_paired(diffs: list[float], wins: int, scale: float = 100.0) -> str:
    """``+1.23 ± 0.45 (3/3)``: mean ± std of the per-seed differences, seeds won."""
    m, s, n = mean_std([d * scale for d in diffs])
    if n == 0:
        return "-"
    spread = f" ± {s:.2f}" if n > 1 else ""
    return f"{m:+.2f}{spread} ({wins}/{n})"


def _long(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["table", "row", "column", "source", "scale", "mean",
                                       "std", "n"])


def table3(results: Path) -> tuple[Table, pd.DataFrame]:
    """Noisy-label test accuracy (%), mean ± std over seeds, ours beside the paper's."""
    # kept whole (~60+ lines): one table, each row's cells built beside the paper's in one pass
    df, scale = table3_runs(results)
    ok = _completed(df)
    long, rows = [], []
    present = [ds for ds in P.TABLE3_DATASETS if len(ok) and (ok["dataset"] == ds).any()]
    n_seeds = int(ok["seed"].nunique()) if len(ok) else None
    for method in method_rows():
        control = method.startswith("random-")
        if control and not (len(ok) and (ok["method"] == method).any()):
            continue  # controls appear once they have records
        cells, our_means, paper_means = [], [], []
        for ds in P.TABLE3_DATASETS:
            accs = [a * 100 for a in _by_seed(ok, ds, method, "final_test_acc").values()]
            failed = df[(df["dataset"] == ds) & (df["method"] == method)
                        & (df["status"] != "completed")] if len(df) else df
            text = fmt_mean_std(accs, expected_n=n_seeds)
            if not accs and len(failed):
                err = str(failed.iloc[0].get("error", ""))
                text = "OOM" if "memory" in err.lower() else "failed"
            cells.append(text)
            m, s, n = mean_std(accs)
            if n:
                our_means.append(m)
            long.append({"table": 3, "row": method, "column": ds, "source": "ours",
                         "scale": scale, "mean": m, "std": s, "n": n})
            paper = None if control else P.TABLE3[method][ds]
            cells.append("not in paper" if control else
                         "OOM" if paper is None else f"{paper[0]:.2f} ± {paper[1]:.2f}")
            if paper is not None and ds in present:
                paper_means.append(paper[0])
            if not control:
                long.append({"table": 3, "row": method, "column": ds, "source": "paper",
                             "scale": "paper", "mean": paper[0] if paper else math.nan,
                             "std": paper[1] if paper else math.nan, "n": 5})
        ours_avg = float(np.mean(our_means)) if our_means else math.nan
        paper_same = float(np.mean(paper_means)) if paper_means else math.nan
        cells += ["-" if math.isnan(ours_avg) else f"{ours_avg:.2f}",
                  "-" if math.isnan(paper_same) else f"{paper_same:.2f}",
                  "-" if control else f"{P.TABLE3_AVG[method]:.2f}"]
        long.append({"table": 3, "row": method, "column": "avg", "source": "ours",
                     "scale": scale, "mean": ours_avg, "std": math.nan, "n": len(our_means)})
        if not control:
            long.append({"table": 3, "row": method, "column": "avg", "source": "paper",
                         "scale": "paper", "mean": P.TABLE3_AVG[method], "std": math.nan,
                         "n": 6})
        rows.append([label(method), *cells])
    header = ["Method"]
    for ds in P.TABLE3_DATASETS:
        header += [f"{P.display(ds)} {OURS}", f"{P.display(ds)} paper"]
    header += [f"Avg. {OURS}", "Avg. paper (same sets)", "Avg. paper (all)"]
    missing = [P.display(d) for d in P.TABLE3_DATASETS if d not in present]
    notes = [f"† {scale_note(df, scale)}.",
             f"Test accuracy in %, mean ± sample std over {n_seeds} seeds ((n=k): a cell with "
             "fewer). Ours is at the scale above, not the paper's: compare directions (which "
             "methods beat Vanilla), not levels.",
             "Random drop (matched to X): trains like Vanilla but drops each sample with the "
             "probability X dropped samples in the same epoch of the same seed, whatever its "
             "value: what X gains over it is what X's choice of samples is worth. Paired "
             "differences: table3_evidence.",
             "Avg. ours is over the datasets we ran; 'paper (same sets)' averages the paper's "
             "numbers over those same datasets."]
    if missing:
        notes.append("Not run at this scale: " + ", ".join(missing)
                     + " (see experiments/table3.yaml).")
    notes.append("'-' in an ours column: no record for that cell; 'OOM'/'failed': the run "
                 "stopped, its record says why.")
    return Table("Table 3: test accuracy (%) under label noise", header, rows,
                 notes), _long(long)


def _memorisation_note(ok: pd.DataFrame, ds: str) -> str | None:
    """How far Vanilla fitted the noisy labels by its last epoch, from its records."""
    g = ok[(ok["dataset"] == ds) & (ok["method"] == "vanilla")] if len(ok) else ok
    pairs = []
    for hist in g.get("history", []):
        last = hist[-1] if isinstance(hist, list) and hist else {}
        if last.get("train_loss_noisy") is not None:
            pairs.append((last["train_loss_noisy"], last["train_loss_clean"]))
    if not pairs:
        return None
    noisy, clean = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
    rate = g["train_noise_rate"].mean() if "train_noise_rate" in g else math.nan
    classes = _CLASSES.get(ds.split("_")[0], 10)
    return (f"{P.display(ds)} ({rate:.0%} noisy labels): Vanilla's last-epoch training loss "
            f"{noisy:.3f} on the noisy labels, {clean:.3f} on the clean ones (mean over "
            f"{len(pairs)} seeds; an untrained {classes}-class model has "
            f"{math.log(classes):.3f})")


# classes of Table 3's datasets (by name prefix), for the untrained model's loss ln(K)
_CLASSES = {"cifar10n": 10, "cifar100n": 100, "news20": 20, "emotion": 6}


def table3_evidence(results: Path) -> tuple[Table, pd.DataFrame]:
    """Per (dataset, method): accuracy, paired differences to Vanilla and to the matched
    control, kept fraction and noisy-label detection."""
    df, scale = table3_runs(results)
    ok = _completed(df)
    long, rows, notes = [], [], []
    for ds in P.TABLE3_DATASETS:
        if not (len(ok) and (ok["dataset"] == ds).any()):
            continue
        vanilla = _by_seed(ok, ds, "vanilla", "final_test_acc")
        for method in evidence_rows(set(ok[ok["dataset"] == ds]["method"])):
            acc = _by_seed(ok, ds, method, "final_test_acc")
            if not acc:
                continue
            g = ok[(ok["dataset"] == ds) & (ok["method"] == method)]
            vs_vanilla = paired(acc, vanilla) if method != "vanilla" else ([], 0)
            vs_control = (paired(acc, _by_seed(ok, ds, control_of(method), "final_test_acc"))
                          if not method.startswith("random-") else ([], 0))
            cells = [P.display(ds), label(method),
                     fmt_mean_std([a * 100 for a in acc.values()]),
                     fmt_paired(*vs_vanilla), fmt_paired(*vs_control),
                     fmt_mean_std(list(g.get("kept_fraction", [])), scale=100, digits=1)]
            for col in ("noisy_auc", "drop_precision", "drop_recall"):
                vals = [v for v in g.get(col, []) if v is not None and not pd.isna(v)]
                cells.append(fmt_mean_std(vals, digits=3) if vals else "-")
                m, s, n = mean_std(vals)
                long.append({"table": "3e", "row": method, "column": f"{ds}/{col}",
                             "source": "ours", "scale": scale, "mean": m, "std": s, "n": n})
            for name, (diffs, _) in (("vs_vanilla", vs_vanilla), ("vs_control", vs_control)):
                m, s, n = mean_std([d * 100 for d in diffs])
                long.append({"table": "3e", "row": method, "column": f"{ds}/{name}",
                             "source": "ours", "scale": scale, "mean": m, "std": s, "n": n})
            rows.append(cells)
        note = _memorisation_note(ok, ds)
        if note:
            notes.append(note + ".")
    header = ["Dataset", "Method", f"test acc % {OURS}", "Δ vs Vanilla (seeds won)",
              "Δ vs its random control (seeds won)", "kept %", "noisy AUC",
              "drop precision", "drop recall"]
    notes = [f"† {scale_note(df, scale)}.",
             "Δ: mean ± std over seeds of the per-seed difference in test accuracy "
             "(percentage points), same seed = same data order and initialisation; "
             "(k/n): seeds where the method was ahead.",
             "noisy AUC: ROC AUC of -value for 'this label is noisy' (0.5 = chance), pooled "
             "over every scored sample and epoch (static methods: their one scoring). Drop "
             "precision: share of dropped samples whose label is noisy (chance = the noise "
             "rate); drop recall: share of noisy samples dropped. A random control's values "
             "are its random draws: its row is what chance looks like.", *notes]
    return Table("Table 3 evidence: paired differences, controls and noisy-label detection",
                 header, rows, notes), _long(long)


def _pooled_cell(diffs: list[float]) -> tuple[str, dict]:
    """``"+1.60 ± 2.59 (6/9; p=0.10, 0.51)"``: mean ± std of paired differences in points,
    the pairs won, and the two-sided p-values of a one-sample t-test and a sign test."""
    from scipy import stats

    pts = [d * 100 for d in diffs]
    wins = sum(d > 0 for d in pts)
    m, s, n = mean_std(pts)
    if n < 2:
        return "-", {"mean": m, "std": s, "n": n}
    p_t = float(stats.ttest_1samp(pts, 0.0).pvalue) if s > 0 else math.nan
    p_sign = float(stats.binomtest(wins, n).pvalue)
    return (f"{m:+.2f} ± {s:.2f} ({wins}/{n}; p={p_t:.3f}, {p_sign:.3f})",
            {"mean": m, "std": s, "n": n, "p_t": p_t, "p_sign": p_sign})


def table3_pooled(results: Path) -> tuple[Table, pd.DataFrame]:
    """Per method: the paired differences to Vanilla and to its matched control, pooled over
    every (CIFAR-10N set, seed) pair that has both runs (text sets are kept apart: another
    model and regime)."""
    df, scale = table3_runs(results)
    ok = _completed(df)
    sets = [ds for ds in P.TABLE3_DATASETS if ds.startswith("cifar10n")
            and len(ok) and (ok["dataset"] == ds).any()]
    rows, long = [], []
    methods = evidence_rows(set(ok[ok["dataset"].isin(sets)]["method"])) if sets else []
    for method in methods:
        if method == "vanilla":
            continue
        cells = [label(method)]
        for name, ref in (("vs_vanilla", "vanilla"), ("vs_control", control_of(method))):
            diffs = []
            for ds in sets:
                diffs += paired(_by_seed(ok, ds, method, "final_test_acc"),
                                _by_seed(ok, ds, ref, "final_test_acc"))[0]
            text, stats_ = _pooled_cell(diffs) if not (
                name == "vs_control" and method.startswith("random-")) else ("-", {"n": 0})
            cells.append(text)
            long.append({"table": "3p", "row": method, "column": name, "source": "ours",
                         "scale": scale, **{k: stats_.get(k, math.nan)
                                            for k in ("mean", "std", "n", "p_t", "p_sign")}})
        rows.append(cells)
    header = ["Method", "Δ vs Vanilla (pairs won; p t-test, sign test)",
              "Δ vs its random control (pairs won; p t-test, sign test)"]
    notes = [f"† {scale_note(df, scale)}." if sets else "No CIFAR-10N records.",
             f"Pooled over {', '.join(P.display(ds) for ds in sets) or 'nothing'}: one pair "
             "per (set, seed) with both runs; Δ in test-accuracy points, mean ± std over the "
             "pairs. p: two-sided one-sample t-test of the differences, and sign test of the "
             "pairs won. The sets share images and seeds (same initialisation and order), "
             "so their pairs are not independent: read p as a guide, not a guarantee."]
    return Table("Table 3, pooled: paired differences over the CIFAR-10N sets",
                 header, rows, notes), pd.DataFrame(long)
