"""Figure 1's pipeline: the batched Shapley path, scripts/fidelity.py, and plot_fig1."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lai.artifacts.figures import plot_fig1
from lai.batching import as_batch
from lai.data.lm import lm_split
from lai.fidelity.shapley import (SGDStepGame, generic_val_loss, gpt_neo_val_loss, pearson,
                                  permutation_shapley, permutation_shapley_many,
                                  sgd_step_utility)
from lai.models import build_model
from tests.conftest import compose_cfg, load_script
from tests.estimators.nets import MLP
from tests.fidelity.test_shapley import random_game

PROXIES = ("lai", "ghost", "lli", "ghost_flat")


def tiny_gpt_neo(seed: int = 0) -> torch.nn.Module:
    """The tiny GPT-Neo causal LM (byte vocabulary), weights scaled up so attention is far from
    uniform and the local layer's window matters."""
    torch.manual_seed(seed)
    model = build_model(compose_cfg("model=gpt_neo").model, task="lm", num_classes=259,
                        vocab_size=259, pad_token_id=256).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wpe" not in name:
                p.mul_(8.0)
    return model


def lm_batch(n: int, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return lm_split(torch.randint(0, 256, (n, t), generator=g)).gather(torch.arange(n))


# ---- the batched Shapley path equals the existing one --------------------------------------

def test_many_estimator_matches_permutation_shapley_exactly():
    u = random_game(7, 2)

    def many(masks):
        return np.array([u(frozenset(np.flatnonzero(m).tolist())) for m in masks])

    for chunk in (1, 5, 64):
        est, se = permutation_shapley_many(many, 7, permutations=60, seed=4, chunk=chunk)
        ref, ref_se = permutation_shapley(u, 7, permutations=60, seed=4)
        assert np.array_equal(est, ref) and np.array_equal(se, ref_se)


def test_sgd_step_game_equals_sgd_step_utility_mlp():
    torch.manual_seed(0)
    model = MLP().double()
    tr = as_batch((torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 5, (6,))))
    va = as_batch((torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 5, (8,))))
    u = sgd_step_utility(model, tr, va, lr=0.3)  # a non-additive game
    game = SGDStepGame(model, tr, va, lr=0.3)
    for s in (frozenset(), frozenset({2}), frozenset({0, 3, 5}), frozenset(range(6))):
        assert math.isclose(game(s), u(s), rel_tol=1e-10, abs_tol=1e-13)
    ref, ref_se = permutation_shapley(u, 6, permutations=40, seed=1)
    calls = []
    est, se = permutation_shapley_many(game.many, 6, permutations=40, seed=1, chunk=7,
                                       progress=calls.append)
    assert np.allclose(est, ref, rtol=1e-9, atol=1e-12)
    assert np.allclose(se, ref_se, rtol=1e-6, atol=1e-12)
    assert sum(calls) == len(game._cache) + 1  # every distinct coalition once, plus the empty


def test_gpt_neo_fast_forward_matches_hugging_face():
    model = tiny_gpt_neo()
    val = lm_batch(3, 80, seed=1)  # 80 > window 64: the local layer's mask is exercised
    fast, generic = gpt_neo_val_loss(model, val), generic_val_loss(model, val)
    assert fast is not None
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        a, b = float(fast(params)), float(generic(params))
        assert math.isclose(a, b, rel_tol=2e-6)
        shifted = {n: p + 0.05 * torch.randn_like(p) for n, p in params.items()}
        assert math.isclose(float(fast(shifted)), float(generic(shifted)), rel_tol=2e-6)
    # padding is not covered: the generic path is used
    padded = lm_batch(3, 80, seed=1)
    padded.inputs["attention_mask"][0, -5:] = 0
    assert gpt_neo_val_loss(model, padded) is None


def test_sgd_step_game_equals_sgd_step_utility_gpt_neo():
    model = tiny_gpt_neo(1)
    tr, va = lm_batch(5, 24, seed=2), lm_batch(4, 24, seed=3)
    u = sgd_step_utility(model, tr, va, lr=0.05)
    game = SGDStepGame(model, tr, va, lr=0.05)  # the fused forward
    scale = abs(game.base)
    for s in (frozenset({1}), frozenset({0, 2, 4}), frozenset(range(5))):
        assert abs(game(s) - u(s)) < 2e-6 * scale
        assert abs(u(s)) > 1e-3 * scale  # the test is not vacuous
    ref, _ = permutation_shapley(u, 5, permutations=10, seed=0)
    est, _ = permutation_shapley_many(game.many, 5, permutations=10, seed=0)
    assert np.abs(est - ref).max() < 1e-5 * scale


# ---- scripts/fidelity.py ---------------------------------------------------------------------

def test_fidelity_script_tiny_run(data_dir, tmp_path):
    script = load_script("fidelity")
    out = tmp_path / "fig1" / "fidelity.json"
    threads = torch.get_num_threads()
    try:  # a tiny workload: threads only add synchronisation (and contend on a busy machine)
        result = script.main(["--steps", "20", "--every", "10", "--permutations", "20",
                              "--val-size", "4", "--data-dir", str(data_dir), "--out",
                              str(out), "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["checkpoints"] == json.loads(json.dumps(result["checkpoints"]))
    s = saved["settings"]
    assert saved["scale"] == "reduced"
    assert (s["steps"], s["every"], s["permutations"], s["batch"], s["val_size"]) == \
        (20, 10, 20, 16, 4)
    assert s["lr"] > 0 and s["seed"] == 0 and s["torch"] == torch.__version__
    assert s["wall_s"] > 0 and s["model"]["layers"] == 2 and s["model"]["hidden"] == 32
    assert s["fast_forward"] is True
    rows = saved["checkpoints"]
    assert [r["step"] for r in rows] == [10, 20]
    for r in rows:
        for key in ("shapley", "shapley_se", *PROXIES):
            v = np.asarray(r[key], dtype=float)
            assert v.shape == (16,) and np.isfinite(v).all(), key
        for m in PROXIES:
            assert math.isclose(r["pearson"][m], pearson(r[m], r["shapley"]), abs_tol=1e-12)
            assert -1 <= r["pearson"][m] <= 1
        # Shapley efficiency: the values sum to U(N) (every permutation's marginals do)
        assert math.isclose(sum(r["shapley"]), r["u_full"], rel_tol=1e-6, abs_tol=1e-6)
        assert len(set(r["train_rows"])) == 16
    for m in PROXIES:
        per = np.array([r["pearson"][m] for r in rows])
        assert math.isclose(saved["summary"][m]["mean"], per.mean(), abs_tol=1e-12)
        assert math.isclose(saved["summary"][m]["std"], per.std(ddof=1), abs_tol=1e-12)
    paths = plot_fig1(saved, tmp_path / "fig1")
    assert all(p.stat().st_size > 0 for p in paths)


def test_paper_scale_parses_and_fails_clearly_offline(tmp_path):
    script = load_script("fidelity")
    args = script.parse_args(["--scale", "paper"])
    assert (args.model, args.steps, args.every, args.permutations) == \
        ("gpt_neo_125m", 10000, 100, 1000)
    assert args.out.parts[-3:] == ("paper", "fig1", "fidelity.json")
    assert script.parse_args(["--scale", "paper", "--steps", "300"]).steps == 300
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache("EleutherAI/gpt-neo-125M", "config.json"),
                            str)
    except ImportError:
        cached = False
    if cached:
        pytest.skip("GPT-Neo-125M is in the local Hugging Face cache: the paper scale would run")
    with pytest.raises(SystemExit, match="--scale reduced"):
        script.main(["--scale", "paper", "--data-dir", str(tmp_path), "--out",
                     str(tmp_path / "f.json"), "--no-progress"])


def test_script_rejects_bad_settings():
    script = load_script("fidelity")
    with pytest.raises(SystemExit):
        script.parse_args(["--every", "100", "--steps", "50"])
    with pytest.raises(SystemExit):
        script.parse_args(["--lr", "0"])


# ---- plot_fig1 -------------------------------------------------------------------------------

def synthetic_fidelity(n_checkpoints: int, with_pearson: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(1, n_checkpoints + 1):
        shap = rng.normal(size=16)
        row = {"step": 10 * k, "shapley": shap.tolist()}
        for m, noise in zip(PROXIES, (0.2, 0.5, 0.3, 0.8)):
            row[m] = (3 * shap + noise * rng.normal(size=16)).tolist()
        if with_pearson:
            row["pearson"] = {m: pearson(row[m], shap) for m in PROXIES}
        rows.append(row)
    return {"scale": "reduced", "checkpoints": rows,
            "settings": {"steps": 10 * n_checkpoints, "permutations": 20, "lr": 0.01,
                         "val_size": 4, "model": {"preset": "tiny", "layers": 2, "hidden": 32}}}


@pytest.mark.parametrize("n,with_pearson", [(8, True), (2, False), (1, True)])
def test_plot_fig1_writes_png_and_pdf(tmp_path, n, with_pearson):
    paths = plot_fig1(synthetic_fidelity(n, with_pearson), tmp_path / "figs" / "fig1")
    assert [p.name for p in paths] == ["fig1.png", "fig1.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plot_fig1_needs_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints"):
        plot_fig1({"checkpoints": []}, tmp_path / "f")
