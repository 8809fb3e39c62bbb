"""The paper's own numbers (Tables 1-4, Figure 1), typed in from the text, for side-by-side
comparison. Nothing in the package computes with them; ``make tables`` prints them next to
ours. Accuracies are percentages, as in the paper."""
from __future__ import annotations

# Table 1: GPT-Neo pre-training on Pile, self-influence. Perplexity after 5,000 and 10,000
# batches; samples removed; "Sample" = samples seen / samples used (1 + removed share).
TABLE1 = {
    "vanilla": {"ppl_half": 8.104929, "ppl_end": 8.086690, "removed": 0, "sample": 1.0000},
    "lai": {"ppl_half": 8.104924, "ppl_end": 8.086686, "removed": 135, "sample": 1.0004},
}
TABLE1_STEPS = (5000, 10000)

# Table 2: GLUE fine-tuning with GPT-Neo-125M (3 vanilla warm-up epochs, then LAI).
TABLE2 = {
    "vanilla": {
        "samples": {"glue_sst2": 67349, "glue_mrpc": 3668, "glue_qnli": 104743, "glue_rte": 2490},
        "val_loss": {"glue_sst2": 0.7121, "glue_mrpc": 1.5022, "glue_qnli": 0.9460,
                     "glue_rte": 1.0101},
        "test_acc": {"glue_sst2": 89.9, "glue_mrpc": 72.0, "glue_qnli": 83.6, "glue_rte": 59.8},
    },
    "lai": {
        "samples": {"glue_sst2": 34301, "glue_mrpc": 1877, "glue_qnli": 52386, "glue_rte": 833},
        "val_loss": {"glue_sst2": 0.5716, "glue_mrpc": 0.7669, "glue_qnli": 0.4978,
                     "glue_rte": 0.6406},
        "test_acc": {"glue_sst2": 90.5, "glue_mrpc": 73.4, "glue_qnli": 84.8, "glue_rte": 61.0},
    },
}

# Table 3: test accuracy (%) under label noise, mean and std over 5 runs; None = OOM.
_T3 = """
vanilla 85.36 0.18 83.19 0.41 75.37 1.05 40.87 0.38 58.99 0.92 84.79 1.55 71.43
lissa   78.67 0.27 74.15 0.44 60.44 0.52 10.16 0.41 63.41 0.90 89.24 1.16 62.68
datainf 79.80 0.41 75.34 0.58 61.90 1.53 30.69 0.71 63.36 0.37 89.08 0.51 66.70
trak    83.68 0.25 80.94 0.42 71.77 0.62 32.93 0.83 OOM - OOM - 67.33
ip      80.64 0.48 78.84 0.73 68.28 0.98 30.82 0.86 63.45 0.75 89.30 0.54 68.56
spl     74.60 2.06 74.42 2.46 65.39 1.41 41.96 0.74 55.71 1.33 79.66 2.08 65.29
ghost   85.52 0.31 83.46 0.59 75.98 0.40 41.90 0.63 63.22 1.16 88.36 0.44 73.07
lli     84.13 0.59 82.49 0.16 75.87 1.50 44.22 0.56 63.38 0.86 88.64 0.52 73.12
lai     84.78 0.52 83.69 0.11 76.43 0.39 44.06 0.73 63.23 0.97 88.45 0.54 73.44
"""
TABLE3_DATASETS = ("cifar10n_aggre", "cifar10n_random1", "cifar10n_worst", "cifar100n",
                   "news20_n", "emotion_n")
TABLE3_METHODS = ("vanilla", "lissa", "datainf", "trak", "ip", "spl", "ghost", "lli", "lai")


def _parse_table3() -> tuple[dict, dict]:
    cells, avg = {}, {}
    for line in _T3.strip().splitlines():
        tok = line.split()
        method, nums, last = tok[0], tok[1:-1], tok[-1]
        cells[method] = {}
        for k, ds in enumerate(TABLE3_DATASETS):
            mean, std = nums[2 * k], nums[2 * k + 1]
            cells[method][ds] = None if mean == "OOM" else (float(mean), float(std))
        avg[method] = float(last)
    return cells, avg


TABLE3, TABLE3_AVG = _parse_table3()

# Table 4: GFLOP per batch and maximum memory (MB) per dataset.
TABLE4_DATASETS = ("cifar10n", "cifar100n", "news20_n", "emotion_n")
TABLE4 = {
    "vanilla": {"gflop": (57.24, 57.32, 1073.91, 1073.90),
                "memory": (3304.67, 3305.49, 5292.08, 5291.83)},
    "ghost": {"gflop": (209.13, 209.32, 2156.07, 2872.02),
              "memory": (4223.74, 4227.10, 12013.19, 12013.38)},
    "lli": {"gflop": (113.15, 113.34, 835.26, 1551.20),
            "memory": (3328.60, 3330.28, 7552.19, 7552.37)},
    "lai": {"gflop": (113.42, 113.61, 839.49, 1555.27),
            "memory": (3716.95, 3718.64, 8053.50, 9053.64)},
}

# Figure 1: Pearson correlation with the Monte-Carlo Shapley reference over 100 checkpoints.
FIG1 = {"lai": {"mean": 0.9617, "std": 0.0217}, "ghost": {"mean": 0.9038, "std": 0.1463}}

DISPLAY = {
    "vanilla": "Vanilla", "lissa": "LiSSA", "datainf": "DataInf", "trak": "TRAK", "ip": "IP",
    "spl": "SPL", "ghost": "Ghost", "lli": "LLI", "lai": "LAI",
    "cifar10n_aggre": "CIFAR-10N-a", "cifar10n_random1": "CIFAR-10N-r",
    "cifar10n_worst": "CIFAR-10N-w", "cifar100n": "CIFAR-100N", "cifar10n": "CIFAR-10N",
    "news20_n": "20News-N", "emotion_n": "Emotion-N", "glue_sst2": "SST-2",
    "glue_mrpc": "MRPC", "glue_qnli": "QNLI", "glue_rte": "RTE", "pile": "Pile",
}


def display(key: str) -> str:
    """The paper's name for a method or dataset key (the key itself when unknown)."""
    return DISPLAY.get(key, key)
