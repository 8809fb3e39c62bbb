"""scripts/bench_online.py keeps working with the Trainer it drives (a seconds-long smoke run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_bench_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_online.py"), "--device",
                        "cpu", "--setups", "resnet18", "--batch", "4", "--steps", "2",
                        "--block", "2", "--warmup", "1", "--methods",
                        "vanilla,lai,lai+filter/2pass", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "online_cpu.json").read_text())
    assert report["speed"] == {"precision": "fp32", "channels_last": "auto", "compile": False,
                               "cudnn_benchmark": False}
    rows = report["setups"]["resnet18"]
    assert set(rows) == {"vanilla", "lai", "lai+filter/2pass"}
    for name, r in rows.items():
        assert r["step_ms"] > 0 and r["ops"] > 0 and r["syncs"] == {}, name
        # peak memory on the CPU: live tensor storage, including what was alive at the start
        assert r["mem_method"] == "tensor_storage", name
        assert r["peak_mem_mb"] > r["mem_start_mb"] > 0, name
        assert r["peak_tensor_mb"] == r["peak_mem_mb"], name
    assert isinstance(rows["lai"]["mem_ratio"], float) and rows["lai"]["mem_ratio"] > 0
    assert rows["lai+filter/2pass"]["gflop"] < rows["vanilla"]["gflop"]
