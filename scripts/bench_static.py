"""Benchmark (not a test): lai's static estimators against dattri's on the same small model.

    pip install dattri            # the reference implementation (0.3.0 was used)
    python scripts/bench_static.py                    # float32 and float64, ~1 minute
    python scripts/bench_static.py --dtypes float32 --repeats 5 --threads 2

Setup: scikit-learn's digits (64 features, 10 classes, pixels / 16), 300 training samples of
which 30% get a wrong label (uniform over the other 9 classes), 100 clean validation
samples; an MLP 64-32-32-10 with tanh (3466 parameters), trained full-batch for 300 Adam
steps (lr 1e-3), so that it fits the clean labels but not yet the noisy ones. CPU only.

For each static estimator (ip, lissa, datainf, trak) it runs
``lai.estimators.static.static_values`` and the corresponding dattri attributor
(TracInAttributor as Grad-Dot, IFAttributorLiSSA, IFAttributorDataInf, TRAKAttributor) with
the hyperparameters mapped onto each other (constants below; the mapping and every
remaining difference are written to the JSON ``settings`` and ``notes``), and reports

- the wall time of each (``time.perf_counter``; one warm-up call, then the median of
  ``--repeats`` calls; dattri's time covers building the task and attributor, ``cache``,
  ``attribute`` and summing its ``[N_train, N_test]`` score matrix over the test axis),
- the time ratio ours / dattri (< 1: ours is faster),
- the Spearman correlation between the two value vectors (scipy.stats.spearmanr),
- the relative L2 difference ``||ours - dattri|| / ||dattri||`` (the mapping makes both the
  same quantity, not just the same ranking, so this is meaningful too),
- the noisy-label AUC of each (sklearn roc_auc_score, score of "noisy" = -value).

Sign and normalisation: a VALUE is positive when up-weighting the training sample lowers
the summed validation loss (cross-entropy; for TRAK its output function, the margin).
dattri's inner-product attributors return ``g_train^T M g_test`` (M = identity, LiSSA's or
DataInf's inverse-Hessian estimate) and TRAK returns
``phi_test^T (Phi^T Phi + r I)^-1 phi_train Q_train``: already "positive = helps"; the dattri
vectors are those matrices summed over the test (= our validation) axis, with no sign flip
and no rescaling.

Extra rows per dtype, to tell implementation differences from the methods' own randomness:
LiSSA of both against the exact damped inverse Hessian (dattri's IFAttributorExplicit) and
seed-to-seed agreement of each; TRAK seed-to-seed agreement of each and both against the
unprojected TRAK (dattri with an identity projection); our DataInf default per-block damping
against dattri's single regularisation; dattri's defaults (DataInf regularization=0.0, TRAK
regularization=0 at proj_dim > n_train). A dattri attributor that fails (e.g. in float64) is
recorded and the others go on.

Threads: ``--threads`` defaults to 1. On these tiny tensors a second intra-op thread buys
nothing, and when another process shares the two cores OpenMP's spin-waiting made single
ops up to ~1000x slower and the timings meaningless. Both implementations always run with
the same setting.

Output: a markdown table per dtype on stdout and ``results/bench/static_vs_dattri.json``
(versions, CPU, load average, settings, per-sample values of both, errors).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lai.batching import as_batch  # noqa: E402
from lai.estimators.static import static_values  # noqa: E402

OUT = ROOT / "results" / "bench" / "static_vs_dattri.json"

# ---- settings -------------------------------------------------------------------------------
SEED = 0
N_TRAIN, N_VAL, NOISE = 300, 100, 0.30
HIDDEN, TRAIN_STEPS, LR = 32, 300, 1e-3
BATCH = 50                      # our training/Hessian batches; dattri's LiSSA batch_size
LISSA = dict(damping=0.1, scale=10.0, depth=100, repeats=1, seed=0)  # damping > |min eig H|
DATAINF_RULE = 0.1              # our default: lambda_b = 0.1 mean_i ||g_ib||^2 / dim_b
TRAK_PROJ_DIM = 2048            # our default; > N_TRAIN, so Phi^T Phi is singular ...
TRAK_DAMP_REL = 1e-2            # ... and needs damping = this x trace(Phi^T Phi) / proj_dim


# ---- data and model -------------------------------------------------------------------------
def make_data(dtype: torch.dtype):
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(X))
    X = torch.tensor(X[perm] / 16.0, dtype=dtype)
    y = torch.tensor(y[perm], dtype=torch.long)
    xt, yt = X[:N_TRAIN], y[:N_TRAIN].clone()
    xv, yv = X[N_TRAIN:N_TRAIN + N_VAL], y[N_TRAIN:N_TRAIN + N_VAL]
    n_noisy = int(round(NOISE * N_TRAIN))
    idx = torch.tensor(rng.choice(N_TRAIN, n_noisy, replace=False))
    yt[idx] = (yt[idx] + torch.tensor(rng.integers(1, 10, n_noisy))) % 10
    noisy = torch.zeros(N_TRAIN, dtype=torch.bool)
    noisy[idx] = True
    return xt, yt, xv, yv, noisy


def make_model(xt, yt, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN),
                          nn.Tanh(), nn.Linear(HIDDEN, 10)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(p_y / (1 - p_y)) = s_y - logsumexp_{c != y} s_c, per row."""
    is_y = torch.arange(logits.shape[-1], device=logits.device) == y.unsqueeze(-1)
    s_y = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return s_y - logits.masked_fill(is_y, float("-inf")).logsumexp(-1)


# ---- dattri tasks ---------------------------------------------------------------------------
def dattri_if_task(model: nn.Module):
    """Task for the inner-product / IF attributors: mean cross-entropy of a batch (their
    per-sample gradients come from batches of one). Labels are cast back to long because
    dattri's LiSSA collate casts every data tensor to float."""
    from dattri.task import AttributionTask

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y.long())

    ckpt = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return AttributionTask(loss_func=loss, model=model, checkpoints=ckpt)


def dattri_trak_task(model: nn.Module):
    """TRAK task: per-sample margin as both the loss (train features) and target (test)."""
    from dattri.task import AttributionTask

    def f(params, data):
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0),))
        return margin(out, y.long().unsqueeze(0))[0]

    ckpt = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return AttributionTask(loss_func=f, model=model, checkpoints=ckpt, target_func=f)


def loader(x, y, bs):
    return DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=False)


# ---- helpers --------------------------------------------------------------------------------
def timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times


def to_np(v: torch.Tensor) -> np.ndarray:
    return v.detach().double().cpu().numpy().ravel()


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    ok = bool(np.all(np.isfinite(a)) and np.all(np.isfinite(b)))
    if not ok:
        return {"spearman": None, "rel_l2": None, "finite": False}
    return {"spearman": float(spearmanr(a, b).statistic),
            "rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)),
            "finite": True}


def auc(noisy: torch.Tensor, v: np.ndarray) -> float | None:
    if not np.all(np.isfinite(v)):
        return None
    return float(roc_auc_score(noisy.numpy(), -v))


def per_sample_sq_norms(model, x, y, fn):
    """Per-sample gradient squared norms per parameter (name -> [N])."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))[0]

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return {k: v.reshape(v.shape[0], -1).pow(2).sum(1) for k, v in g.items()}


# ---- one dtype ------------------------------------------------------------------------------
def run_dtype(dtype: torch.dtype, repeats: int) -> dict:
    from dattri.algorithm import (IFAttributorDataInf, IFAttributorExplicit,
                                  IFAttributorLiSSA, TracInAttributor, TRAKAttributor)

    xt, yt, xv, yv, noisy = make_data(dtype)
    model = make_model(xt, yt, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        val_acc = float((model(xv).argmax(1) == yv).float().mean())
        fit = model(xt).argmax(1) == yt
    info = {"n_params": n_params, "val_acc": val_acc,
            "train_fit_clean": float(fit[~noisy].float().mean()),
            "train_fit_noisy": float(fit[noisy].float().mean())}

    idx = torch.arange(N_TRAIN)
    train_batches = [as_batch((xt[i:i + BATCH], yt[i:i + BATCH])) for i in range(0, N_TRAIN,
                                                                                  BATCH)]
    for b, i in zip(train_batches, range(0, N_TRAIN, BATCH)):
        b.idx = idx[i:i + BATCH]
    val_batches = [as_batch((xv, yv))]

    # data-dependent constants (computed once, not timed)
    ce = lambda lo, yy: nn.functional.cross_entropy(lo, yy, reduction="none")  # noqa: E731
    sq = per_sample_sq_norms(model, xt, yt, ce)
    names = [n for n, _ in model.named_parameters()]
    blocks = sorted({n.rsplit(".", 1)[0] for n in names}, key=lambda m: names.index(m + ".weight"))
    block_lambda = {}
    for m in blocks:
        members = [n for n in names if n.rsplit(".", 1)[0] == m]
        dim = sum(dict(model.named_parameters())[n].numel() for n in members)
        block_lambda[m] = float(DATAINF_RULE * sum(sq[n] for n in members).mean() / dim)
    datainf_fixed = float(DATAINF_RULE * sum(sq.values()).mean() / n_params)
    sq_m = per_sample_sq_norms(model, xt, yt, margin)
    trak_damping = float(TRAK_DAMP_REL * sum(sq_m.values()).sum() / TRAK_PROJ_DIM)

    settings = {
        "lissa": {"ours": dict(LISSA), "dattri": {
            "batch_size": BATCH, "num_repeat": LISSA["repeats"],
            "recursion_depth": LISSA["depth"], "scaling": LISSA["scale"],
            "damping": LISSA["damping"] / LISSA["scale"]}},
        "datainf": {"ours": {"damping": datainf_fixed},
                    "dattri": {"regularization": datainf_fixed},
                    "ours_default_rule_lambda_b": block_lambda},
        "trak": {"ours": {"proj_dim": TRAK_PROJ_DIM, "damping": trak_damping, "seed": 0},
                 "dattri": {"proj_dim": TRAK_PROJ_DIM, "proj_type": "normal", "proj_seed": 0,
                            "regularization": trak_damping / n_params}},
        "ip": {"ours": {}, "dattri": {"attributor": "TracInAttributor", "weight_list": [1.0],
                                       "normalized_grad": False, "proj_type": "identity"}},
    }

    full_loader = loader(xt, yt, N_TRAIN)
    test_loader = loader(xv, yv, N_VAL)

    def ours(method, **opts):
        def fn():
            return to_np(static_values(method, model, train_batches, val_batches,
                                       train_batches, **opts))
        return fn

    def dattri_ip():
        m = copy.deepcopy(model)
        att = TracInAttributor(task=dattri_if_task(m), weight_list=torch.ones(1),
                               normalized_grad=False,
                               projector_kwargs={"proj_type": "identity", "device": "cpu"})
        return to_np(att.attribute(loader(xt, yt, N_TRAIN), test_loader).sum(1))

    def dattri_lissa(seed=LISSA["seed"]):
        def fn():
            torch.manual_seed(seed)  # dattri samples its LiSSA batches from the global RNG
            m = copy.deepcopy(model)
            s = settings["lissa"]["dattri"]
            att = IFAttributorLiSSA(task=dattri_if_task(m), device="cpu", **s)
            att.cache(full_loader)
            return to_np(att.attribute(loader(xt, yt, N_TRAIN), test_loader).sum(1))
        return fn

    def dattri_datainf(reg):
        def fn():
            m = copy.deepcopy(model)
            att = IFAttributorDataInf(task=dattri_if_task(m), device="cpu", regularization=reg)
            att.cache(full_loader)
            return to_np(att.attribute(loader(xt, yt, N_TRAIN), test_loader).sum(1))
        return fn

    def dattri_trak(seed=0, proj_type="normal", regularization=None):
        s = settings["trak"]["dattri"]
        reg = s["regularization"] if regularization is None else regularization

        def fn():
            m = copy.deepcopy(model)
            att = TRAKAttributor(
                task=dattri_trak_task(m),
                correct_probability_func=_correct_prob(m),
                projector_kwargs={"proj_dim": s["proj_dim"], "proj_seed": seed,
                                  "proj_max_batch_size": 32, "device": "cpu",
                                  "proj_type": proj_type},
                device="cpu", regularization=reg)
            att.cache(loader(xt, yt, BATCH))
            return to_np(att.attribute(test_loader).sum(1))
        return fn

    # (method, ours, dattri, short note for the table, full note for the JSON)
    plan = [
        ("ip", ours("ip"), dattri_ip,
         "same definition",
         "dattri Grad-Dot = TracInAttributor(one checkpoint, weight 1, normalized_grad=False, "
         "identity projection); score <g_train, g_test> summed over the test axis equals our "
         "<g_V, g_j>; no sign flip, no rescaling"),
        ("lissa", ours("lissa", **LISSA), dattri_lissa(),
         "dattri damping = ours/scale; own batch sampling; 1 recursion per test sample",
         "dattri's recursion is h <- v + (1-d) h - H h / scale, ours h <- v + (1 - lambda/scale)"
         " h - H h / scale, so d = lambda / scale (same (H + lambda I)^-1 target); dattri "
         f"draws a fresh random batch of {BATCH} (without replacement, global RNG) per step and "
         "runs one recursion per test sample (vmapped over the 100 test gradients), ours one "
         "recursion on the summed validation gradient over a reshuffled fixed partition into "
         f"batches of {BATCH}: the two agree up to LiSSA's sampling noise (see the noise-floor "
         "and exact-inverse rows)"),
        ("datainf", ours("datainf", damping=datainf_fixed), dattri_datainf(datainf_fixed),
         "same formula, same fixed lambda in every block",
         "both: v_j = sum_b g_Vb^T [1/(n lambda) sum_i (I - g_ib g_ib^T/(lambda + |g_ib|^2))] "
         "g_jb, blocks = Linear layers (weight + bias), Hessian samples = the 300 training "
         "samples. lambda = 0.1 * mean_i |g_i|^2 / #params (the whole-model analogue of our "
         "per-block default) given to both; dattri has no per-block rule (one "
         "regularization for all layers; its default 0.0 divides by zero, see below); our "
         "default per-block rule is compared separately below"),
        ("trak", ours("trak", proj_dim=TRAK_PROJ_DIM, damping=trak_damping, seed=0),
         dattri_trak(),
         "different random projections: compare with the seed-to-seed floor below",
         "same margin output f = log(p_y/(1-p_y)) for train and test features, Q = 1 - p_y, "
         "Gaussian projection N(0,1)/sqrt(k) in both, one checkpoint; dattri divides the "
         "gradients by sqrt(#params), so regularization r = our damping / #params gives the "
         f"same score; proj_dim {TRAK_PROJ_DIM} > n_train makes Phi^T Phi singular, which "
         "dattri solves with torch.linalg.solve (our default damping=0 falls back to a "
         "pseudo-inverse), hence a damping in both; the projection matrices come from different "
         "generators, so the two agree only up to projection noise"),
    ]

    rows = []
    for method, f_ours, f_dattri, short, note in plan:
        row = {"method": method, "short_note": short, "notes": note}
        v_ours, t_ours, ts_ours = timed(f_ours, repeats)
        row.update(ours_s=t_ours, ours_times=ts_ours, auc_ours=auc(noisy, v_ours))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v_d, t_d, ts_d = timed(f_dattri, repeats)
            row.update(dattri_s=t_d, dattri_times=ts_d, ratio=t_ours / t_d,
                       auc_dattri=auc(noisy, v_d), **compare(v_ours, v_d))
            row["values_dattri"] = v_d.tolist()
        except Exception as e:  # noqa: BLE001
            row.update(dattri_s=None, ratio=None, auc_dattri=None, spearman=None,
                       rel_l2=None, error=f"{type(e).__name__}: {e}".splitlines()[0][:300],
                       traceback=traceback.format_exc()[-3000:])
            row["short_note"] = f"dattri FAILED: {row['error']}"
        row["values_ours"] = v_ours.tolist()
        rows.append(row)
        print(f"  [{dtype}] {method}: done", file=sys.stderr, flush=True)

    extra = []
    by = {r["method"]: r for r in rows}
    # exact damped inverse-Hessian reference for LiSSA (dattri's explicit Hessian), one call
    v_exact = None
    try:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        att = IFAttributorExplicit(task=dattri_if_task(m), device="cpu",
                                   regularization=LISSA["damping"])
        att.cache(full_loader)
        v_exact = to_np(att.attribute(loader(xt, yt, N_TRAIN), test_loader).sum(1))
        t_exact = time.perf_counter() - t0
        e = {"name": "lissa vs exact (H + damping I)^-1 [dattri IFAttributorExplicit]",
             "exact_s_single_call": t_exact, "auc_exact": auc(noisy, v_exact),
             "ours_vs_exact": compare(np.array(by["lissa"]["values_ours"]), v_exact)}
        if by["lissa"].get("values_dattri"):
            e["dattri_vs_exact"] = compare(np.array(by["lissa"]["values_dattri"]), v_exact)
        extra.append(e)
    except Exception as ex:  # noqa: BLE001
        extra.append({"name": "lissa vs exact", "error": f"{type(ex).__name__}: {ex}"[:300]})
    # LiSSA sampling-noise floor: another seed of each implementation
    v_l1 = ours("lissa", **{**LISSA, "seed": LISSA["seed"] + 1})()
    extra.append({"name": "lissa noise floor: ours seed 0 vs ours seed 1",
                  **compare(np.array(by["lissa"]["values_ours"]), v_l1)})
    if by["lissa"].get("values_dattri"):
        try:
            v_dl1 = dattri_lissa(seed=LISSA["seed"] + 1)()
            extra.append({"name": "lissa noise floor: dattri seed 0 vs dattri seed 1",
                          **compare(np.array(by["lissa"]["values_dattri"]), v_dl1)})
        except Exception as ex:  # noqa: BLE001
            extra.append({"name": "lissa noise floor (dattri)",
                          "error": f"{type(ex).__name__}: {ex}"[:300]})
    # ours with a few recursions averaged (dattri in effect averages one per test sample)
    reps = 4
    t0 = time.perf_counter()
    v_l4 = ours("lissa", **{**LISSA, "repeats": reps})()
    e = {"name": f"lissa: ours with repeats={reps} (dattri in effect averages {N_VAL} "
                 "recursions, one per test sample)",
         "ours_s_single_call": time.perf_counter() - t0}
    if v_exact is not None:
        e["vs_exact"] = compare(v_l4, v_exact)
    if by["lissa"].get("values_dattri"):
        e["vs_dattri"] = compare(v_l4, np.array(by["lissa"]["values_dattri"]))
    extra.append(e)
    # our DataInf default per-block rule vs dattri's fixed regularisation
    v_rule = ours("datainf")()
    e = {"name": "datainf: ours default per-block lambda_b vs dattri fixed regularization",
         "auc_ours_rule": auc(noisy, v_rule)}
    if by["datainf"].get("values_dattri"):
        e.update(compare(v_rule, np.array(by["datainf"]["values_dattri"])))
    extra.append(e)
    # dattri DataInf with its default regularization=0.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v0 = dattri_datainf(0.0)()
        extra.append({"name": "dattri datainf with default regularization=0.0",
                      "finite": bool(np.all(np.isfinite(v0))),
                      "n_nonfinite": int((~np.isfinite(v0)).sum())})
    except Exception as ex:  # noqa: BLE001
        extra.append({"name": "dattri datainf with default regularization=0.0",
                      "error": f"{type(ex).__name__}: {ex}"[:300]})

    # TRAK: projection noise floor (seed 0 vs seed 1 within each implementation) and the
    # unprojected TRAK (dattri, identity projection: kernel G^T G / P + r I) as reference
    def one_call(name, fn):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn()
        except Exception as ex:  # noqa: BLE001
            extra.append({"name": name, "error": f"{type(ex).__name__}: {ex}"[:300]})
            return None

    v_o0 = np.array(by["trak"]["values_ours"])
    v_d0 = np.array(by["trak"]["values_dattri"]) if by["trak"].get("values_dattri") else None
    v_o1 = ours("trak", proj_dim=TRAK_PROJ_DIM, damping=trak_damping, seed=1)()
    extra.append({"name": "trak noise floor: ours seed 0 vs ours seed 1", **compare(v_o0, v_o1)})
    v_d1 = one_call("trak noise floor: dattri seed 0 vs seed 1", dattri_trak(seed=1))
    if v_d1 is not None and v_d0 is not None:
        extra.append({"name": "trak noise floor: dattri seed 0 vs dattri seed 1",
                      **compare(v_d0, v_d1)})
    v_id = one_call("trak unprojected reference", dattri_trak(proj_type="identity"))
    if v_id is not None:
        e = {"name": "trak vs unprojected TRAK (dattri proj_type=identity, same damping)",
             "auc_unprojected": auc(noisy, v_id),
             "ours_seed0": compare(v_o0, v_id), "ours_seed1": compare(v_o1, v_id)}
        if v_d0 is not None:
            e["dattri_seed0"] = compare(v_d0, v_id)
        if v_d1 is not None:
            e["dattri_seed1"] = compare(v_d1, v_id)
        extra.append(e)
    v_r0 = one_call("dattri trak with regularization=0 (its default)",
                    dattri_trak(regularization=0.0))
    if v_r0 is not None:
        extra.append({"name": "dattri trak with regularization=0 (its default) at "
                      f"proj_dim={TRAK_PROJ_DIM} > n_train", **compare(v_o0, v_r0),
                      "note": "vs ours with damping"})

    return {"dtype": str(dtype).replace("torch.", ""), "model": info, "settings": settings,
            "noisy_train_indices": torch.nonzero(noisy).flatten().tolist(),
            "rows": rows, "extra": extra}


def _correct_prob(model):
    def p(params, data):
        x, y = data
        out = functional_call(model, params, (x.unsqueeze(0),))
        return torch.exp(-nn.functional.cross_entropy(out, y.long().unsqueeze(0)))
    return p


def fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(res: dict) -> str:
    lines = [f"### {res['dtype']}  (val acc {res['model']['val_acc']:.2f}, "
             f"{res['model']['n_params']} params)", "",
             "| method | ours s | dattri s | time ratio ours/dattri | Spearman | rel L2 diff "
             "| AUC ours | AUC dattri | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {fmt(r['ours_s'], '.4f')} | {fmt(r['dattri_s'], '.4f')} | "
            f"{fmt(r['ratio'], '.3f')} | {fmt(r['spearman'], '.4f')} | "
            f"{fmt(r.get('rel_l2'), '.2e')} | {fmt(r['auc_ours'])} | {fmt(r['auc_dattri'])} | "
            f"{r['short_note']} |")
    lines.append("")
    def show(v):
        if isinstance(v, dict) and "spearman" in v:
            return (f"Spearman {fmt(v['spearman'], '.4f')} (rel L2 {fmt(v['rel_l2'], '.2e')})"
                    if v.get("finite") else "non-finite values")
        return format(v, ".4g") if isinstance(v, float) else str(v)

    for e in res["extra"]:
        if "spearman" in e:
            body = [show(e)] + [f"{k}={show(v)}" for k, v in e.items()
                                if k not in ("name", "spearman", "rel_l2", "finite")]
        else:
            body = [f"{k}={show(v)}" for k, v in e.items() if k != "name"]
        lines.append(f"- {e['name']}: " + ", ".join(body))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for both implementations (default 1; 0 = "
                         "torch's default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before the run; other processes "
              "compete for the CPU and distort the timings", file=sys.stderr)

    import dattri

    t_start = time.perf_counter()
    results = []
    for name in args.dtypes:
        results.append(run_dtype(getattr(torch, name), args.repeats))
    total = time.perf_counter() - t_start

    meta = {
        "torch": torch.__version__, "dattri": getattr(dattri, "__version__", None),
        "python": platform.python_version(), "processor": platform.processor(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "total_s": total,
        "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg(),
        "timing": f"one warm-up call, median of {args.repeats}",
        "sign": "VALUE, positive = helps (lowers summed validation CE); dattri matrices "
                "[N_train, N_test] summed over the test axis, no sign flip, no rescaling",
        "setup": {"data": "sklearn digits / 16", "n_train": N_TRAIN, "n_val": N_VAL,
                  "label_noise": NOISE, "model": f"MLP 64-{HIDDEN}-{HIDDEN}-10 tanh",
                  "train": f"{TRAIN_STEPS} full-batch Adam steps, lr {LR}", "seed": SEED,
                  "our_batch_size": BATCH},
    }
    try:
        with open("/proc/cpuinfo") as fh:
            meta["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in fh
                                      if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        from importlib.metadata import version
        meta["dattri"] = version("dattri")
    except Exception:  # noqa: BLE001
        pass

    for res in results:
        print(table(res))
        print()
    print(f"total {total:.1f} s; torch {meta['torch']}, dattri {meta['dattri']}, "
          f"{meta['cpu_count']} CPUs ({meta.get('cpu_model') or meta['processor']}), "
          f"{meta['torch_threads']} torch threads, load average before/after "
          f"{load_before[0]:.2f}/{meta['loadavg_1_5_15_after'][0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
