"""Figure 2 from a run folder with saved scores: within-epoch percentiles, files written."""
from __future__ import annotations

import json

import numpy as np

from lai.artifacts.fig2 import epoch_percentiles, pick_examples, plot_fig2


def test_epoch_percentiles_rank_within_each_epoch():
    v = np.array([[3.0, 1.0, np.nan, 2.0], [-1e6, 5e6, 0.0, 1.0]])
    p = epoch_percentiles(v)
    assert np.allclose(p[0], [100.0, 0.0, np.nan, 50.0], equal_nan=True)
    assert np.allclose(p[1], [0.0, 100.0, 100 / 3, 200 / 3])


def test_plot_fig2_from_saved_scores(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    (run / "scores").mkdir(parents=True)
    n, epochs = 200, 4
    noisy = rng.random(n) < 0.4
    np.save(run / "scores" / "noisy.npy", noisy)
    for e in range(epochs):
        values = rng.normal(size=n) * 10 ** e - 2.0 * noisy * 10 ** e  # noisy rank lower
        kept = (values >= 0).astype(np.int8)
        np.savez_compressed(run / "scores" / f"epoch_{e:03d}.npz", values=values.astype(np.float32),
                            kept=kept)
    (run / "summary.json").write_text(json.dumps({"dataset": "cifar10n_worst"}))
    paths = plot_fig2(run, tmp_path / "fig2", "test scale")
    assert [p.name for p in paths] == ["fig2.png", "fig2.pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    picks = pick_examples(*[np.stack([np.load(run / "scores" / f"epoch_{e:03d}.npz")[k]
                                      for e in range(epochs)]) for k in ("values", "kept")],
                          noisy)
    assert "clean label" in picks[0][1] and "noisy label" in picks[1][1]
