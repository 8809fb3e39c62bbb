"""Rebuild the paper's Tables 1-4 and Figures 1-2 from the run records in results/.

    make tables                  # = python scripts/make_tables.py
    python scripts/make_tables.py --results results --only table3,fig2

Reads results/{paper,reduced}/<artifact>/ (paper scale preferred when present),
results/bench/online_*.json and results/{paper,reduced}/fig1/fidelity.json; writes
results/tables/table{1,2,3,3_evidence,3_pooled,4}.{md,tex,csv} and
results/figures/{fig1,fig2,detection}.{png,pdf}.
It never trains: an artifact without records is still written, with its cells empty and a
note naming the experiment to run (experiments/<artifact>.yaml).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lai.artifacts.collect import SCALES, find_artifact_runs  # noqa: E402
from lai.artifacts.render import write_table  # noqa: E402
from lai.artifacts.tables import TABLES  # noqa: E402

ARTIFACTS = (*TABLES, "fig1", "fig2", "detection")
README_START, README_END = "<!-- table3:start -->", "<!-- table3:end -->"


def update_readme(readme: Path, table3_md: Path) -> bool:
    """Put the current Table 3 between the README's table3 markers; True when it changed."""
    if not readme.is_file() or not table3_md.is_file():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = table3_md.read_text().replace("### Table 3", "#### Table 3", 1)
    new = f"{head}{README_START}\n{body}{README_END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


def make_fig1(results: Path, out: Path) -> list[Path]:
    for scale in SCALES:
        path = results / scale / "fig1" / "fidelity.json"
        if path.is_file():
            from lai.artifacts.figures import plot_fig1

            return plot_fig1(json.loads(path.read_text()), out / "fig1")
    print("fig1: no results/{paper,reduced}/fig1/fidelity.json; run "
          "`python scripts/run_experiment.py fig1`", file=sys.stderr)
    return []


def make_fig2(results: Path, out: Path) -> list[Path]:
    from lai.artifacts.fig2 import fig2_scale_label, plot_fig2

    df, scale = find_artifact_runs(results, "fig2")
    if scale is None:
        print("fig2: no runs under results/{paper,reduced}/fig2; run "
              "`python scripts/run_experiment.py fig2`", file=sys.stderr)
        return []
    ok = df[(df["status"] == "completed") & (df["estimator"] == "lai")].sort_values("seed")
    run_dir = Path(ok.iloc[0]["run_dir"])
    return plot_fig2(run_dir, out / "fig2", fig2_scale_label(run_dir, scale))


def make_detection(results: Path, out: Path) -> list[Path]:
    from lai.artifacts.detection import (detection_scale_label, load_detection_runs,
                                         plot_detection)

    for scale in SCALES:
        runs = load_detection_runs(results / scale / "detection")
        if len(runs):
            return plot_detection(runs, out / "detection", detection_scale_label(runs, scale))
    print("detection: no runs under results/{paper,reduced}/detection; run "
          "`python scripts/run_experiment.py detection`", file=sys.stderr)
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--readme", default=None,
                    help="README to refresh with Table 3 (default: ./README.md when --results "
                         "is ./results, else none)")
    ap.add_argument("--only", default=",".join(ARTIFACTS),
                    help=f"comma-separated subset of: {', '.join(ARTIFACTS)}")
    args = ap.parse_args(argv)
    results = Path(args.results)
    wanted = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = sorted(set(wanted) - set(ARTIFACTS))
    if unknown:
        print(f"error: unknown artifact(s) {unknown}; expected: {', '.join(ARTIFACTS)}",
              file=sys.stderr)
        return 2
    written: list[Path] = []
    for name in wanted:
        t0 = time.perf_counter()
        if name in TABLES:
            table, long_form = TABLES[name](results)
            paths = write_table(table, results / "tables" / name, long_form)
        elif name == "fig1":
            paths = make_fig1(results, results / "figures")
        elif name == "fig2":
            paths = make_fig2(results, results / "figures")
        else:
            paths = make_detection(results, results / "figures")
        written += paths
        print(f"{name}: {', '.join(str(p.relative_to(results)) for p in paths) or 'nothing'} "
              f"({time.perf_counter() - t0:.1f} s)")
    readme = Path(args.readme) if args.readme else (
        ROOT / "README.md" if results.resolve() == (ROOT / "results").resolve() else None)
    if readme is not None and "table3" in wanted and \
            update_readme(readme, results / "tables" / "table3.md"):
        print(f"{readme.name}: Table 3 refreshed")
    print(f"{len(written)} files written under {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
