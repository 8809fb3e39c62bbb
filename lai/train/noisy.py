"""How the policy's decisions line up with the labels known to be noisy."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def detection_metrics(values: np.ndarray, kept: np.ndarray, noisy: np.ndarray) -> dict:
    """Noisy-label detection by the scores of the samples that were scored.

    ``values`` ``[N]`` (NaN = not scored), ``kept`` ``[N]`` (1 kept, 0 dropped, -1 unseen),
    ``noisy`` ``[N]`` bool. Treating "dropped" as the prediction "this label is noisy":

    - ``drop_precision``: share of dropped samples whose label is noisy (None if none dropped);
    - ``drop_recall``: share of scored noisy samples that were dropped;
    - ``drop_rate_noisy`` / ``drop_rate_clean``: share of scored noisy / clean samples dropped;
    - ``noisy_auc``: ROC AUC of ``-value`` as a noisy-label score (0.5 = chance; None when
      only one class was scored). Lower value = more likely noisy.
    """
    scored = np.isfinite(values) & (kept >= 0)
    v, k, n = values[scored], kept[scored] == 0, noisy[scored].astype(bool)
    out: dict = {"drop_precision": None, "drop_recall": None, "drop_rate_noisy": None,
                 "drop_rate_clean": None, "noisy_auc": None}
    if v.size == 0:
        return out
    dropped_noisy = int((k & n).sum())
    if k.any():
        out["drop_precision"] = dropped_noisy / int(k.sum())
    if n.any():
        out["drop_recall"] = out["drop_rate_noisy"] = dropped_noisy / int(n.sum())
    if (~n).any():
        out["drop_rate_clean"] = int((k & ~n).sum()) / int((~n).sum())
    if n.any() and (~n).any():
        out["noisy_auc"] = float(roc_auc_score(n, -v))
    return out
