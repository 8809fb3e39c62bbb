"""Write one table as Markdown, LaTeX and CSV without extra dependencies.

A table is a header row, body rows of strings, a title and notes; ``write_table`` writes
``<stem>.md``, ``<stem>.tex`` and ``<stem>.csv`` (the CSV holds the same cells as the others,
plus any long-form frame given) and returns the paths.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def fmt_mean_std(values, scale: float = 1.0, digits: int = 2, expected_n: int | None = None) -> str:
    """``mean ± std`` of the finite values times ``scale``; ``-`` when there are none.
    The std is the sample standard deviation (ddof=1), as for the paper's 5 runs. ``(n=k)``
    is appended when k differs from ``expected_n`` (always when ``expected_n`` is None and
    k == 1, since a single run has no spread)."""
    vals = [float(v) * scale for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    tag = f" (n={len(vals)})" if (expected_n is not None and len(vals) != expected_n) or \
        (expected_n is None and len(vals) == 1) else ""
    if len(vals) == 1:
        return f"{mean:.{digits}f}{tag}"
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}{tag}"


def to_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.header) + " |",
             "|" + "|".join("---" for _ in t.header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in t.rows]
    if t.notes:
        lines += [""] + [f"- {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


def _tex_escape(s: str) -> str:
    out = s
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"),
                 ("#", r"\#"), ("±", r"$\pm$"), ("×", r"$\times$"), ("†", r"$^\dagger$")):
        out = out.replace(a, b)
    return out


def to_latex(t: Table) -> str:
    cols = "l" + "r" * (len(t.header) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_tex_escape(t.title)}}}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(_tex_escape(h) for h in t.header) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in r) + r" \\" for r in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {_tex_escape(n)}" for n in t.notes]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(t: Table, stem: Path, long_form: pd.DataFrame | None = None) -> list[Path]:
    """Write ``stem``.md/.tex/.csv. The CSV is ``long_form`` when given (one number per row,
    machine-readable), else the displayed cells."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, tex, csv_path = (stem.with_suffix(s) for s in (".md", ".tex", ".csv"))
    md.write_text(to_markdown(t))
    tex.write_text(to_latex(t))
    if long_form is not None:
        long_form.to_csv(csv_path, index=False)
    else:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(t.header)
            w.writerows(t.rows)
    return [md, tex, csv_path]
