"""Run one experiment (or a --multirun sweep) from the Hydra configs in conf/.

    python run.py estimator=lai dataset=cifar10n_worst data_dir=../shared/data
    python run.py --multirun estimator=vanilla,lai,lli dataset=digits_n seed=0,1
    LAI_PLUGINS=my_package.my_estimator python run.py estimator=mine   (docs/extending.md)
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lai.cli import is_rank_zero, run_and_report, summary_line
from lai.config import register_configs
from lai.plugins import load_plugins

try:
    load_plugins()  # $LAI_PLUGINS and the lai.plugins entry points: before the config store
except ImportError as e:
    sys.exit(f"error: {e}")
register_configs()


def _in_sweep() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra context (called directly)
        return False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    summary, status = run_and_report(cfg, in_sweep=_in_sweep())
    if summary is not None:
        if is_rank_zero():  # torchrun: one line, from rank 0
            print(summary_line(summary))
        return summary
    if status >= 128 or not _in_sweep():  # one bad job must not end a sweep; a signal does
        sys.exit(status)
    return None


if __name__ == "__main__":
    main()
