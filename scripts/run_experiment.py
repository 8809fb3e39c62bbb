"""Run the sweep behind one paper artifact, at the paper's or the reduced scale.

    python scripts/run_experiment.py --list
    python scripts/run_experiment.py table3 --scale reduced
    python scripts/run_experiment.py table3 --scale paper --launcher slurm
    python scripts/run_experiment.py fig2 --scale reduced --dry-run     # print, do not run

The sweeps are Hydra experiment configs, ``conf/experiment/<artifact>/<scale>[/<part>].yaml``
(their ``hydra.sweeper.params`` and results folder); ``experiments/<artifact>.yaml`` lists
them per scale with what Hydra cannot say (see experiments/README.md). An ``experiment``
sweep becomes ``python run.py --multirun experiment=<name>``; a ``command`` sweep (a script
with its own arguments) runs as written. Extra ``key=value`` arguments after ``--`` are appended to
every run.py sweep (e.g. ``-- data_dir=../shared/data device=cpu``). A scale may name its
``launcher`` (``local``: parallel jobs) and ``threads_per_job`` (OMP_NUM_THREADS, unless set).
Exit status: the first failing sweep's, after all sweeps were tried.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def available() -> list[str]:
    """Names of the artifacts that have an experiment file."""
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def sweep_commands(artifact: str, scale: str, launcher: str | None = None,
                   extra: list[str] | None = None) -> list[list[str]]:
    """The argv lists that produce ``artifact`` at ``scale`` (``paper`` or ``reduced``).

    Raises ``ValueError`` naming the valid choices when the artifact or the scale is unknown.
    """
    path = EXPERIMENTS / f"{artifact}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown artifact {artifact!r}; expected one of: {', '.join(available())}")
    # unresolved: an override may carry an interpolation for run.py (run_name='${estimator.name}')
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    scales = spec.get("scales", {})
    if scale not in scales:
        raise ValueError(f"{artifact} has no scale {scale!r}; expected one of: {', '.join(scales)}")
    entry = scales[scale]
    commands = []
    for sweep in entry["sweeps"]:
        if "command" in sweep:
            argv = [str(a) for a in sweep["command"]]
            commands.append([sys.executable if argv[0] == "python" else argv[0], *argv[1:]])
            continue
        argv = [sys.executable, "run.py", "--multirun", f"experiment={sweep['experiment']}",
                "trainer.progress=false"]
        if launcher or entry.get("launcher"):
            argv.append(f"hydra/launcher={launcher or entry['launcher']}")
        commands.append(argv + list(extra or []))
    return commands


def sweep_env(artifact: str, scale: str) -> dict[str, str]:
    """The environment the sweeps run in: the scale's ``threads_per_job`` (e.g. two jobs at
    one thread each on a 2-core CPU) as OMP_NUM_THREADS, unless the caller set it."""
    entry = OmegaConf.load(EXPERIMENTS / f"{artifact}.yaml").scales[scale]
    env = dict(os.environ)
    if entry.get("threads_per_job") and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(entry.threads_per_job)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", help="an experiments/<artifact>.yaml name")
    ap.add_argument("--scale", default="reduced",
                    help="reduced | paper | another scale the artifact's file names (paper_code)")
    ap.add_argument("--launcher", default=None, help="a hydra/launcher option (run.py sweeps)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--list", action="store_true", help="list the artifacts")
    ap.add_argument("extra", nargs="*", help="overrides appended to every run.py sweep")
    args = ap.parse_intermixed_args(argv)
    if args.list or not args.artifact:
        print("\n".join(available()))
        return 0
    try:
        commands = sweep_commands(args.artifact, args.scale, args.launcher, args.extra)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    for cmd in commands:
        print("$", shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=sweep_env(args.artifact, args.scale))
        print(f"# exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
