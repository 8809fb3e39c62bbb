"""Run one experiment (or a --multirun sweep) from the Hydra configs in conf/.

    python run.py estimator=lai dataset=cifar10n_worst data_dir=../shared/data
    python run.py --multirun estimator=vanilla,lai,lli dataset=digits_n seed=0,1
"""
from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lai.config import ConfigError, register_configs
from lai.errors import MissingResourceError, TrainingDivergedError
from lai.train.records import RunInUseError

register_configs()


def _in_sweep() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra context (called directly)
        return False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from lai.train.runner import run_experiment

    try:
        summary = run_experiment(cfg)
    except (ConfigError, MissingResourceError, MemoryError, RunInUseError,
            TrainingDivergedError) as e:
        # MemoryError: e.g. TRAK's up-front estimate; the run folder says "failed"
        kind = "out of memory: " if isinstance(e, MemoryError) else ""
        print(f"error: {kind}{e}", file=sys.stderr)
        if _in_sweep():  # one bad job must not end a sweep; its record says why
            return None
        sys.exit(3 if isinstance(e, MemoryError) else 4 if isinstance(e, TrainingDivergedError)
                 else 2)
    except Exception as e:  # noqa: BLE001 - in a sweep, record and go on with the next job
        if not _in_sweep():
            raise
        print(f"error: run failed ({type(e).__name__}: {e}); see its summary.json",
              file=sys.stderr)
        return None
    line = (f"[{summary['dataset']} / {summary['estimator']} / seed {summary['seed']}] "
            f"test acc {summary['final_test_acc']:.4f}  kept {summary['kept_fraction']:.3f}  "
            f"val loss {summary['final_val_loss']:.4f}  {summary['wall_time_s']:.1f}s  "
            f"-> {summary['run_dir']}")
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: one line, from rank 0
        print(line)
    return summary


if __name__ == "__main__":
    main()
