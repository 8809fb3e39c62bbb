"""The quick offline demo: vanilla vs LAI on scikit-learn's digits with 40% label noise.

    make demo                     # or: python scripts/demo.py [extra Hydra overrides]

Composes the same Hydra config as ``run.py`` (dataset=digits_n, model=mlp), runs each method
with the same seed, and prints test accuracy, kept fraction and wall time per method.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lai.config import register_configs  # noqa: E402
from lai.train.runner import run_experiment  # noqa: E402

METHODS = ("vanilla", "lai")


def main(extra: list[str]) -> None:
    register_configs()
    rows = []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for method in METHODS:
            cfg = compose("config", overrides=["dataset=digits_n", f"estimator={method}",
                                                f"results_dir={ROOT / 'results' / 'runs'}",
                                                "trainer.progress=false", *extra])
            print(f"running {method} ...", flush=True)
            rows.append(run_experiment(cfg))
    noise = rows[0].get("train_noise_rate", float("nan"))
    print(f"\ndigits_n: {rows[0]['n_train']} training samples, {noise:.0%} noisy labels, "
          f"{rows[0]['n_val']} clean validation, {rows[0]['n_test']} test; "
          f"MLP, {rows[0]['epochs']} epochs, seed {rows[0]['seed']}\n")
    header = (f"| {'method':<8} | {'test acc':>8} | {'best acc':>8} | {'kept':>6} | "
              f"{'noisy dropped':>13} | {'clean dropped':>13} | {'wall s':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    def rate(x: float | None) -> str:
        return f"{x:13.3f}" if x is not None else f"{'-':>13}"

    for r in rows:
        print(f"| {r['estimator']:<8} | {r['final_test_acc']:8.4f} | {r['best_test_acc']:8.4f} | "
              f"{r['kept_fraction']:6.3f} | {rate(r.get('drop_rate_noisy'))} | "
              f"{rate(r.get('drop_rate_clean'))} | {r['wall_time_s']:6.1f} |")
    print("\nkept: share of training samples used for updates; noisy/clean dropped: share of "
          "the samples with a noisy/clean label that the policy dropped.")
    print(f"\nrun folders: {', '.join(r['run_dir'] for r in rows)}")


if __name__ == "__main__":
    main(sys.argv[1:])
