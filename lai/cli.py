"""What ``run.py`` does with one composed config: run it and turn the ways it can end into
one line and an exit status (no traceback for anything the user can fix)."""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

from lai.errors import (ConfigError, MissingResourceError, RunInterrupted,
                        TrainingDivergedError, describe_os_error)
from lai.train.records import RunInUseError

# exit statuses: 2 the config, the data or the results folder; 3 out of memory; 4 the loss
# diverged; 128 + the signal for Ctrl-C / SIGTERM (the shell's convention)
EXIT_STATUS = {ConfigError: 2, MissingResourceError: 2, RunInUseError: 2, OSError: 2,
               MemoryError: 3, TrainingDivergedError: 4}
SIGNAL_STATUS = {"SIGINT": 130, "SIGTERM": 143}


def run_and_report(cfg: Any, in_sweep: bool = False) -> tuple[Optional[dict], int]:
    """``(summary, 0)`` for a finished run; ``(None, status)`` after printing one
    ``error: ...`` line to stderr. In a sweep a run's failure is recorded in its folder and
    the sweep goes on; an interruption stops the sweep too."""
    from lai.train.runner import run_experiment

    try:
        return run_experiment(cfg), 0
    except RunInterrupted as e:
        where = f" ({e.run_dir})" if e.run_dir else ""
        print(f"{e}{where}", file=sys.stderr)
        return None, SIGNAL_STATUS.get(e.signal_name, 130)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("interrupted", file=sys.stderr)
        return None, 130
    except (ConfigError, MissingResourceError, MemoryError, RunInUseError,
            TrainingDivergedError, OSError) as e:
        status = next(v for k, v in EXIT_STATUS.items() if isinstance(e, k))
        if isinstance(e, MemoryError):  # e.g. TRAK's up-front estimate
            message = f"out of memory: {e}"
        elif isinstance(e, OSError) and not isinstance(e, MissingResourceError):
            message = f"cannot use a file or folder: {describe_os_error(e)}"
        else:
            message = str(e)
        print(f"error: {message}", file=sys.stderr)
        return None, status
    except Exception as e:  # noqa: BLE001 - in a sweep, record and go on with the next job
        if not in_sweep:
            raise
        print(f"error: run failed ({type(e).__name__}: {e}); see its summary.json",
              file=sys.stderr)
        return None, 1


def summary_line(summary: dict) -> str:
    """The one line ``run.py`` prints for a finished run."""
    return (f"[{summary['dataset']} / {summary['estimator']} / seed {summary['seed']}] "
            f"test acc {summary['final_test_acc']:.4f}  kept {summary['kept_fraction']:.3f}  "
            f"val loss {summary['final_val_loss']:.4f}  {summary['wall_time_s']:.1f}s  "
            f"-> {summary['run_dir']}")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
