"""scripts/gpu_check.py's CPU dry run: every step runs at tiny sizes and leaves its results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, load_script


def test_dry_run_runs_every_step_and_writes_its_results(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run",
                        "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = [s["step"] for s in summary["steps"]]
    assert names == ["tests", "bench_fp32", "bench_bf16", "table3_probe", "table3",
                     "table3_control"]
    assert all(s["returncode"] == 0 and not s["timed_out"] for s in summary["steps"])
    assert summary["steps"][0]["files"] == ["tests/estimators/test_gpu.py"]
    for precision in ("fp32", "bf16"):
        bench = json.loads((tmp_path / f"bench_{precision}.json").read_text())
        rows = bench["setups"]["bert"]
        assert set(rows) == {"vanilla", "lai"} and bench["speed"]["precision"] == precision
    sizing = summary["table3_sizing"]
    assert sizing["epochs"] == 1 and sizing["seeds"] == 2 and sizing["epoch_s"] > 0
    runs = [json.loads(f.read_text()) for f in (tmp_path / "table3").rglob("summary.json")]
    assert sorted((r["method"], r["seed"]) for r in runs) == [
        ("lai", 0), ("lai", 1), ("random-lai", 0), ("random-lai", 1),
        ("vanilla", 0), ("vanilla", 1)]
    assert all(r["status"] == "completed" for r in runs)


def test_bad_arguments_and_no_gpu():
    script = load_script("gpu_check")
    if not __import__("torch").cuda.is_available():
        assert script.main(["--out", "/nonexistent/x"]) == 2  # no CUDA: says so, runs nothing
    import pytest

    with pytest.raises(SystemExit):
        script.main(["--dry-run", "--only", "everything"])
    with pytest.raises(SystemExit):
        script.main(["--dry-run", "--seeds", "1"])
