"""One command for a lent GPU: the CUDA tests, the paper-size bench, a mid-scale Table 3 slice.

    make gpu-check                          # = python scripts/gpu_check.py (CUDA, ~12 minutes)
    python scripts/gpu_check.py --dry-run   # CPU, tiny sizes, seconds per step (CI runs it)

Three steps, in this order, each in its own process under its own time limit; each writes its
result under ``--out`` (default ``results/gpu/``) before the next starts, and
``summary.json`` is rewritten after every step (name, command, wall seconds, exit status,
whether it hit its limit), so a run cut off still leaves what it measured:

1. ``tests``: ``pytest -m gpu`` over the test files that carry the mark (the offload cache,
   the host-side buffer snapshot, the forward fast paths under bf16 autocast and
   channels-last, the sdpa route, the replay probe: ``tests/estimators/test_gpu.py``);
   ``tests.log`` and the pass/fail/skip counts in the summary. The data-parallel test needs
   two processes per device; NCCL refuses two ranks on one GPU, so on a one-GPU machine it
   is not run (it runs on CPU processes with gloo in ``make test``).
2. ``bench_fp32`` and ``bench_bf16``: ``scripts/bench_online.py`` at the paper's sizes
   (``--size full``: ResNet-18 batch 512, bert-base shape batch 32, gpt-neo-125M shape batch
   8) for vanilla, LAI, LLI, Ghost and LAI with its cache offloaded, each JSON with the
   GPU-busy time per step (``gpu_busy_ms``).
3. ``table3``: CIFAR-10N-worst with every image ``../shared/data`` holds (10,000: 9,000 train,
   the clean 10% for validation), the paper's trainer (``conf/trainer/cifar.yaml``:
   ResNet-18, batch 512, SGD lr 1e-2, momentum 0.9, wd 5e-4, cosine), Vanilla, LAI and the
   random-drop control matched to LAI, ``--seeds`` seeds (at least 2). **Sizing**: a 1-epoch
   Vanilla run first measures the seconds per epoch ``t`` (data loading and the first
   evaluation included); the epoch count is ``E = min(150, floor(left / (seeds * 3.4 * t)))``
   where ``left`` is what remains of ``--budget`` and 3.4 = 1 (Vanilla) + 1.4 (LAI, the
   committed H100 bench's step ratio) + 1 (the control); the summary says which ``E`` it
   chose and why (150 is the paper's).

Exit status: 0 when every step exited 0 within its limit, 1 otherwise (the summary says
which). ``--only`` runs a subset of the steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "bench_fp32", "bench_bf16", "table3")
LAI_COST = 1.4  # LAI's step over vanilla's, ResNet-18 b512 (results/bench/online_cuda.json)


def gpu_test_files() -> list[str]:
    """The test files that carry the ``gpu`` mark."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "mark.gpu" in p.read_text())


class Runner:
    """Runs the steps and keeps ``summary.json`` current."""

    def __init__(self, out: Path, budget: float, dry_run: bool):
        self.out, self.budget, self.dry_run = out, budget, dry_run
        self.t0 = time.perf_counter()
        self.summary: dict = {"dry_run": dry_run, "budget_s": budget, "steps": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def run(self, name: str, cmd: list[str], limit: float, log: Path | None = None,
            **extra) -> dict:
        """Run ``cmd`` with at most ``limit`` seconds (and never past the budget); record it."""
        limit = max(1.0, min(limit, self.left()))
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=limit)
            rc, timed_out, output = p.returncode, False, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, timed_out = None, True
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout
                                                                                     or "")
        if log is not None:
            log.write_text(output)
        row = {"step": name, "command": " ".join(cmd), "limit_s": round(limit, 1),
               "wall_s": round(time.perf_counter() - t0, 1), "returncode": rc,
               "timed_out": timed_out, "output_tail": output[-1500:], **extra}
        self.summary["steps"].append(row)
        self.write()
        print(f"[{name}] {'timed out' if timed_out else f'exit {rc}'} after {row['wall_s']} s",
              flush=True)
        return row

    def write(self) -> None:
        self.summary["wall_s"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")


def step_tests(r: Runner, py: str, limit: float) -> None:
    files = gpu_test_files()
    row = r.run("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                          *files], limit, r.out / "tests.log", files=files)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                row["output_tail"])}
    row["counts"] = counts
    r.write()


def step_bench(r: Runner, py: str, precision: str, limit: float, device: str) -> None:
    if r.dry_run:
        sizes = ["--size", "tiny", "--setups", "bert", "--batch", "4", "--steps", "2",
                 "--block", "2", "--warmup", "1", "--min-seconds", "0",
                 "--methods", "vanilla,lai"]
    else:
        sizes = ["--size", "full", "--steps", "16", "--min-seconds", "2",
                 "--methods", "vanilla,lai,lli,ghost,lai/offload"]
    r.run(f"bench_{precision}", [py, "scripts/bench_online.py", "--device", device,
                                 "--precision", precision, *sizes, "--out", str(r.out),
                                 "--name", f"bench_{precision}"],
          limit, r.out / f"bench_{precision}.log")


def step_table3(r: Runner, py: str, device: str, seeds: int, data_dir: str) -> None:
    common = [f"data_dir={data_dir}", f"device={device}", "trainer.progress=false",
              "dataset.download=false", f"results_dir={r.out / 'table3'}"]
    have_cifar = (Path(data_dir) / "cifar10n").is_dir()
    dataset = "dataset=cifar10n_worst" if have_cifar else "dataset=digits_n"  # the dry run
    if r.dry_run:  # without ../shared/data: digits (vector data) with an MLP
        common += ["model=small_cnn" if have_cifar else "model=mlp", "model.hidden=4",
                   "dataset.train_limit=128", "dataset.val_limit=32", "dataset.test_limit=64",
                   "trainer.batch_size=32"]
    # the epoch time, measured (a separate results folder: not one of the table's runs)
    probe = r.run("table3_probe", [py, "run.py", dataset, "estimator=vanilla", "seed=0",
                                   "trainer.epochs=1", *common[:-1],
                                   f"results_dir={r.out / 'table3_probe'}"],
                  r.left(), r.out / "table3_probe.log")
    epoch_s = probe["wall_s"]
    left = r.left()
    epochs = max(1, min(150, math.floor(left / (seeds * (2 + LAI_COST) * max(epoch_s, 1e-3)))))
    sizing = {"epoch_s": epoch_s, "left_s": round(left, 1), "seeds": seeds, "epochs": epochs,
              "rule": f"min(150, floor(left / (seeds * (2 + {LAI_COST}) * epoch_s)))"}
    if r.dry_run:
        epochs = sizing["epochs"] = 1
    r.summary["table3_sizing"] = sizing
    r.write()
    seed_list = ",".join(str(s) for s in range(seeds))
    per_run = (2 + LAI_COST) * epochs * epoch_s
    r.run("table3", [py, "run.py", "--multirun", dataset, "estimator=vanilla,lai",
                     f"seed={seed_list}", f"trainer.epochs={epochs}", *common],
          per_run * seeds, r.out / "table3.log", sizing=sizing)
    r.run("table3_control", [py, "run.py", "--multirun", dataset, "estimator=vanilla",
                             "policy=random", "policy.match=lai", f"seed={seed_list}",
                             f"trainer.epochs={epochs}", *common],
          r.left(), r.out / "table3_control.log")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="on the CPU at tiny sizes (seconds per step): checks the script")
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu"))
    ap.add_argument("--budget", type=float, default=720.0, help="seconds for everything")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--data-dir", default=os.environ.get("LAI_DATA",
                                                         str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--only", default=",".join(STEPS), help=f"subset of: {', '.join(STEPS)}")
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown or args.seeds < 2:
        ap.error(f"unknown step(s) {unknown}" if unknown else "--seeds must be >= 2")
    py = sys.executable
    device = "cpu"
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
            return 2
        device = "cuda"
    r = Runner(Path(args.out), args.budget, args.dry_run)
    # limits: the tests and each bench get a fixed share, the Table 3 slice the rest
    if "tests" in wanted:
        step_tests(r, py, 150 if not args.dry_run else 120)
    for precision in ("fp32", "bf16"):
        if f"bench_{precision}" in wanted:
            step_bench(r, py, precision, 150 if not args.dry_run else 120, device)
    if "table3" in wanted:
        step_table3(r, py, device, args.seeds, args.data_dir)
    r.write()
    ok = all(s["returncode"] == 0 and not s["timed_out"] for s in r.summary["steps"])
    print(f"gpu_check: {'all steps passed' if ok else 'some steps failed'} in "
          f"{r.summary['wall_s']} s; {r.out / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
