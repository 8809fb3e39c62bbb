"""Run one experiment (or a --multirun sweep) from the Hydra configs in conf/.

    python run.py estimator=lai dataset=cifar10n_worst data_dir=../shared/data
    python run.py --multirun estimator=vanilla,lai,lli dataset=digits_n seed=0,1
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from lai.config import ConfigError, register_configs
from lai.errors import MissingResourceError

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from lai.train.runner import run_experiment

    try:
        summary = run_experiment(cfg)
    except (ConfigError, MissingResourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except MemoryError as e:  # e.g. TRAK's up-front estimate; the run folder says "failed"
        print(f"error: out of memory: {e}", file=sys.stderr)
        sys.exit(3)
    line = (f"[{summary['dataset']} / {summary['estimator']} / seed {summary['seed']}] "
            f"test acc {summary['final_test_acc']:.4f}  kept {summary['kept_fraction']:.3f}  "
            f"val loss {summary['final_val_loss']:.4f}  {summary['wall_time_s']:.1f}s  "
            f"-> {summary['run_dir']}")
    print(line)
    return summary


if __name__ == "__main__":
    main()
