"""Where one method's training step spends its time (a diagnostic, not a benchmark).

    python scripts/profile_step.py --device cuda --size full bert:vanilla bert:lai gpt_neo:lai

For each ``setup:method`` (the names of ``scripts/bench_online.py``) it builds the bench's
Trainer, runs ``--steps`` steps back to back and prints the host's dispatch time per step
beside the wall time (equal when the device waits on the host: a host-bound step), then a
``torch.profiler`` table of the operations with the most device time (CPU time on a CPU).
The README's H100 profile figures (host dispatch 72.0 ms of a 72.0 ms gpt-neo-125M step;
LAI's fp32 ``simt_sgemm`` on bert-base) were measured with this code before it became a
script.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_online as bench  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="setup:method, e.g. bert:lai")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", default="auto", choices=("auto",) + bench.SIZES)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rows", type=int, default=22, help="rows of the profiler table")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size if args.size != "auto" else ("full" if cuda else "tiny")
    speed = {"precision": "bf16" if cuda else "fp32", "channels_last": "auto", "compile": False}
    if cuda:
        torch.backends.cudnn.benchmark = True
    for run in args.runs:
        setup, _, method = run.partition(":")
        if setup not in bench.SETUPS or not method:
            sys.exit(f"expected setup:method with setup in {bench.SETUPS}, got {run!r}")
        mb = bench.MethodBench(setup, method, device, size, args.batch, speed, warmup=3)
        bench._sync(device)
        t0 = time.perf_counter()
        mb.run(args.steps, flush=False)
        t1 = time.perf_counter()
        bench._sync(device)
        t2 = time.perf_counter()
        print(f"== {setup} {method}: host dispatch {(t1 - t0) / args.steps * 1e3:.1f} ms/step, "
              f"wall {(t2 - t0) / args.steps * 1e3:.1f} ms/step")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            mb.run(4)
            bench._sync(device)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows,
                                        max_name_column_width=60))
        del mb
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
