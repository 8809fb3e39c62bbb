"""Figure 1 of the paper (§5.1): fidelity of LAI, Ghost and LLI against a Shapley reference.

    python scripts/fidelity.py --data-dir ../shared/data            # reduced scale, CPU
    python scripts/fidelity.py --scale paper --device cuda          # GPT-Neo-125M (hub)

Pre-trains GPT-Neo on the ``pile`` dataset with the trainer settings of
``conf/trainer/pretrain.yaml`` (AdamW(0.9, 0.95), lr 1e-4, wd 0.01, grad clip 1.0, cosine
decay, batches of 8 blocks of 128 tokens), the warm-up scaled with the run (500 of 10,000
steps -> 50 of 1,000). Every ``--every`` steps the model is snapshot (in memory, in eval
mode) and, on a seeded batch of 16 training blocks and a fixed seeded validation batch of
``--val-size`` blocks, the script computes

- LAI, Ghost (exact), LLI and the paper code's flattened Ghost (``ghost_flat``,
  :mod:`lai.estimators.online.ghost_flat`) values with :func:`lai.value` (positive = helps), and
- the Monte-Carlo permutation Shapley value of each of the 16 samples in the one-SGD-step
  game ``U(S) = L_V(theta) - L_V(theta - lr * sum_{i in S} grad ell_i)`` (summed losses;
  :mod:`lai.fidelity.shapley`), stored divided by ``lr`` so it is in Ghost's units;

then the Pearson correlation of each proxy with the Shapley values. Per checkpoint the JSON
also keeps ``U(N)/lr`` and the lone values ``U({i})/lr``: ``nonadditivity`` =
``|U(N) - sum_i U({i})| / sum_i |U({i})|`` says how far the game is from first order.

**Step size of the game** (``--lr``, default 0.01). The trainer's own lr (1e-4) is an
*AdamW* step size; taken as an SGD step on summed per-sample losses it leaves the game
additive to ~0.1% (Shapley / lr = Ghost to three digits: a trivial check). At 0.1 the
second-order terms dominate (non-additivity > 0.8, Shapley values anti-correlated with the
first-order ones). 0.01 keeps the game mostly first order but not trivially so: on the
reduced run the non-additivity is 0.02-0.16 (median 0.11) and Shapley / lr differs from
Ghost by 2-18% (relative L2) at all checkpoints but one; the full-batch step
``lr * |sum_i grad ell_i|`` (``step_norm_full`` in the JSON, 0.14-0.25) is 10-30 AdamW steps
of this run at its peak learning rate (``optimizer_step_norm``). A sample with an unusually
large gradient can still make one checkpoint's game strongly non-additive (step 850 of the
reduced run: Shapley / lr differs from Ghost by 78%). The same default is kept at paper
scale, untested there. Use ``--lr`` to study the dependence.

Scales (``--scale``; any flag given explicitly wins):

- ``reduced`` (default): tiny GPT-Neo (hidden 32, 2 layers, byte tokenizer, random init),
  1,000 steps, a checkpoint every 50 (20), 200 permutations; ~12 CPU-minutes (15 min wall
  measured with 2 threads on 2 cores shared with another job, at 78% of one core). Data:
  ``pile`` = Pile-uncopyrighted if prepared, else the stand-in corpus of ``shared/data``
  (WikiText-2 + Gutenberg; the JSON says which).
- ``paper``: ``model=gpt_neo_125m`` (needs EleutherAI/gpt-neo-125M from the Hugging Face
  hub, or ``--override model.name_or_path=/local/folder``), 10,000 steps, every 100 (100
  checkpoints), 1,000 permutations: a GPU job.

Speed: each Shapley utility is one validation forward (about 2,300 distinct coalitions per
checkpoint at 200 permutations); ``lai.fidelity.shapley`` evaluates them with a fused GPT-Neo
forward (~11 ms for 32 x 128 tokens on one CPU core). On a machine whose cores are busy with
other jobs, OpenMP's default spin-waiting makes ``--threads 2`` several times *slower* than
one thread (measured 78 vs 11 ms per forward); run with ``OMP_WAIT_POLICY=PASSIVE`` or
``--threads 1`` there.

Output: ``--out`` (default ``results/<scale>/fig1/fidelity.json``), plotted by
:func:`lai.artifacts.figures.plot_fig1` (``--figure STEM`` does it at the end).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lai import value  # noqa: E402
from lai.batching import Batch, forward_logits, per_sample_loss  # noqa: E402
from lai.config import register_configs  # noqa: E402
from lai.artifacts.paper_values import FIG1  # noqa: E402
from lai.data import build_data, resolve_data_dir  # noqa: E402
from lai.errors import MissingDataError, MissingModelError, MissingResourceError  # noqa: E402
from lai.fidelity.shapley import (SGDStepGame, gpt_neo_val_loss, pearson,  # noqa: E402
                                  permutation_shapley_many)
from lai.models import build_model, build_tokenizer  # noqa: E402
from lai.train.optim import build_optimizer, build_scheduler  # noqa: E402

PROXIES = ("lai", "ghost", "lli", "ghost_flat")
BATCH = 16  # samples valued per checkpoint (paper §5.1)
SCALES = {
    "reduced": {"model": "gpt_neo", "steps": 1000, "every": 50, "permutations": 200,
                "lr": 0.01, "val_size": 32},
    "paper": {"model": "gpt_neo_125m", "steps": 10000, "every": 100, "permutations": 1000,
              "lr": 0.01, "val_size": 32},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="reduced",
                   help="preset of the settings below (default: reduced)")
    p.add_argument("--steps", type=int, help="pre-training steps (reduced 1000, paper 10000)")
    p.add_argument("--every", type=int, help="checkpoint period in steps (50 / 100)")
    p.add_argument("--permutations", type=int, help="Monte-Carlo permutations (200 / 1000)")
    p.add_argument("--lr", type=float, help="SGD step size of the Shapley game (0.01)")
    p.add_argument("--val-size", type=int, help="validation blocks (32)")
    p.add_argument("--warmup", type=int,
                   help="warm-up steps (default: the trainer's 500/10,000, scaled to --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed-batch", action="store_true",
                   help="value the same 16 training blocks at every checkpoint (default: a "
                        "fresh seeded draw per checkpoint)")
    p.add_argument("--data-dir", help="data folder (default: $LAI_DATA, else ~/.cache/lai)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--valuation-dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the checkpoint copy that is valued (default float32)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override, e.g. model.name_or_path=/models/gpt-neo-125M")
    p.add_argument("--out", type=Path, help="JSON path (default results/<scale>/fig1/"
                                            "fidelity.json)")
    p.add_argument("--figure", type=Path, metavar="STEM",
                   help="also plot Figure 1 to STEM.png / STEM.pdf")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for key, default in SCALES[args.scale].items():
        if getattr(args, key, None) is None:
            setattr(args, key, default)
    if args.out is None:
        args.out = ROOT / "results" / args.scale / "fig1" / "fidelity.json"
    for key in ("steps", "every", "permutations", "val_size"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.every > args.steps:
        p.error("--every must not exceed --steps (no checkpoint would be taken)")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    return args


def compose_config(args: argparse.Namespace):
    register_configs()
    overrides = ["dataset=pile", f"model={args.model}", f"seed={args.seed}"]
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides + list(args.override))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(cfg, scale: str, device: torch.device):
    """(data, model, tokenizer) as a run of ``cfg`` builds them; a clear SystemExit when the
    data or the model cannot be had."""
    try:
        tokenizer = build_tokenizer(cfg.model.tokenizer, cfg.model)
        data = build_data(cfg.dataset, data_dir=resolve_data_dir(cfg.data_dir), seed=cfg.seed,
                          tokenizer=tokenizer)
        seed_everything(cfg.seed)
        model = build_model(cfg.model, task=data.task, num_classes=data.num_classes,
                            input_shape=None, vocab_size=len(tokenizer),
                            pad_token_id=getattr(tokenizer, "pad_token_id", None))
    except MissingModelError as err:
        hint = (" --scale paper needs GPT-Neo-125M: run where the Hugging Face hub is "
                "reachable, or pass --override model.name_or_path=/path/to/gpt-neo-125M "
                "(and model.tokenizer=the same folder); for an offline run use --scale reduced."
                if scale == "paper" else "")
        raise SystemExit(f"fidelity.py: cannot load the model: {err}.{hint}") from err
    except (MissingDataError, MissingResourceError) as err:
        raise SystemExit(f"fidelity.py: data not found: {err} (pass --data-dir or set "
                         "LAI_DATA)") from err
    return data, model.to(device), tokenizer


def model_sizes(model: torch.nn.Module) -> dict:
    c = model.config
    return {"n_params": sum(p.numel() for p in model.parameters()),
            "hidden": c.hidden_size, "layers": c.num_layers, "heads": c.num_heads,
            "vocab": c.vocab_size, "attention_layers": list(c.attention_layers),
            "window_size": c.window_size}


def valuation_batches(data, step: int, args, device) -> tuple[Batch, Batch, list[int]]:
    """The seeded training batch of 16 blocks for checkpoint ``step`` (the same at every
    checkpoint with ``--fixed-batch``) and the fixed validation batch."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + (0 if args.fixed_batch else step))
    rows = torch.randperm(len(data.train), generator=g)[:BATCH]
    gv = torch.Generator().manual_seed(args.seed * 1_000_003 - 1)
    vrows = torch.randperm(len(data.val), generator=gv)[:args.val_size]
    return (data.train.gather(rows).to(device), data.val.gather(vrows).to(device),
            rows.tolist())


def value_checkpoint(snap: torch.nn.Module, train: Batch, val: Batch, args, step: int,
                     progress: bool) -> dict:
    """Proxies, Shapley reference and their Pearson correlations at one checkpoint."""
    t0 = time.perf_counter()
    row: dict = {"step": step}
    for m in PROXIES:
        row[m] = value(snap, train, val, method=m).double().cpu().tolist()
    game = SGDStepGame(snap, train, val, args.lr)
    n = len(train)
    with tqdm(total=None, desc=f"shapley @{step}", unit="coal", leave=False,
              disable=not progress, dynamic_ncols=True) as bar:
        phi, se = permutation_shapley_many(game.many, n, args.permutations,
                                           seed=args.seed * 1_000_003 + step,
                                           progress=bar.update)
    # the full coalition and the singletons: how far the game is from first order
    masks = np.vstack([np.ones((1, n), bool), np.eye(n, dtype=bool)])
    u = game.many(masks)
    lone = u[1:]
    # size of the game's largest step, to compare with the optimizer's own steps
    row["step_norm_full"] = float(args.lr * game.grads.sum(0).norm())
    row["shapley"] = (phi / args.lr).tolist()
    row["shapley_se"] = (se / args.lr).tolist()
    row["u_full"] = float(u[0] / args.lr)
    row["u_singletons"] = (lone / args.lr).tolist()
    row["nonadditivity"] = float(abs(u[0] - lone.sum()) / max(np.abs(lone).sum(), 1e-300))
    row["val_loss"] = game.base / len(val)
    row["pearson"] = {m: pearson(row[m], row["shapley"]) for m in PROXIES}
    row["seconds"] = time.perf_counter() - t0
    return row


def summarize(rows: list[dict]) -> dict:
    """Mean, sample std (ddof 1), median and min over checkpoints of each proxy's Pearson
    correlation (NaN correlations, from a constant vector, are counted and left out)."""
    out = {}
    for m in PROXIES:
        r = np.array([row["pearson"][m] for row in rows], dtype=float)
        ok = r[np.isfinite(r)]
        out[m] = {"mean": float(ok.mean()) if len(ok) else float("nan"),
                  "std": float(ok.std(ddof=1)) if len(ok) > 1 else float("nan"),
                  "median": float(np.median(ok)) if len(ok) else float("nan"),
                  "min": float(ok.min()) if len(ok) else float("nan"),
                  "n": int(len(ok)), "n_nan": int(len(r) - len(ok))}
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the study; write and return the JSON dict (see the module docstring)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fidelity.py: --device cuda but no CUDA device is available")
    cfg = compose_config(args)
    data, model, _ = build(cfg, args.scale, device)
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    base_steps = int(tcfg["max_steps"] or args.steps)
    warmup = (args.warmup if args.warmup is not None
              else int(round(tcfg["warmup_steps"] * args.steps / base_steps)))
    tcfg.update(warmup_steps=warmup, max_steps=args.steps)
    tcfg = OmegaConf.create(tcfg)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg, args.steps)
    dtype = getattr(torch, args.valuation_dtype)
    progress = not args.no_progress

    gen = torch.Generator().manual_seed(args.seed)
    bs = int(tcfg.batch_size)
    order, pos = torch.randperm(len(data.train), generator=gen), 0
    rows, losses = [], []
    fast_forward = None  # whether the fused GPT-Neo validation forward was used
    bar = tqdm(range(1, args.steps + 1), desc="pre-train", disable=not progress,
               dynamic_ncols=True)
    for step in bar:
        if pos + bs > len(order):  # next epoch
            order, pos = torch.randperm(len(data.train), generator=gen), 0
        batch = data.train.gather(order[pos:pos + bs]).to(device)
        pos += bs
        model.train()
        loss = per_sample_loss(forward_logits(model, batch.inputs), batch.labels).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        checkpoint = step % args.every == 0
        if checkpoint:
            before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if checkpoint:
            after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            snap = copy.deepcopy(model).to(dtype).eval()  # the checkpoint (in memory)
            train_b, val_b, train_rows = valuation_batches(data, step, args, device)
            if fast_forward is None:
                fast_forward = gpt_neo_val_loss(snap, val_b) is not None
            row = value_checkpoint(snap, train_b, val_b, args, step, progress)
            row["train_loss"] = float(np.mean(losses[-args.every:]))
            row["train_rows"] = train_rows
            row["optimizer_step_norm"] = float((after - before).norm())
            rows.append(row)
            del snap
            bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                            r_lai=f"{row['pearson']['lai']:.3f}",
                            r_ghost=f"{row['pearson']['ghost']:.3f}")
    bar.close()
    result = {
        "figure": "fig1",
        "scale": args.scale,
        "settings": {
            "steps": args.steps, "every": args.every, "checkpoints": len(rows),
            "permutations": args.permutations, "lr": args.lr, "batch": BATCH,
            "val_size": args.val_size, "seed": args.seed, "fixed_batch": args.fixed_batch,
            "game": "U(S) = L_V(theta) - L_V(theta - lr * sum_{i in S} grad ell_i); summed "
                    "per-sample losses (mean over tokens); shapley stored as value / lr",
            "shapley_estimator": "Monte-Carlo permutations (lai.fidelity.shapley)",
            "pearson_std_ddof": 1,
            "valuation_dtype": args.valuation_dtype,
            "fast_forward": fast_forward,
            "model": {"config": cfg.model.name, "preset": cfg.model.preset,
                      "name_or_path": cfg.model.name_or_path, **model_sizes(model)},
            "data": {k: data.info.get(k) for k in ("name", "corpus", "standin", "block_size",
                                                  "train", "val")},
            "trainer": {k: OmegaConf.to_object(tcfg)[k] for k in ("optimizer", "lr", "betas", "eps",
                                             "weight_decay", "schedule", "warmup_steps",
                                             "grad_clip", "batch_size")},
            "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "wall_s": None,
        },
        "checkpoints": rows,
        "summary": summarize(rows),
        "paper": FIG1,
    }
    result["settings"]["wall_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, allow_nan=True) + "\n")
    if args.figure is not None:
        from lai.artifacts.figures import plot_fig1
        plot_fig1(result, args.figure)
    if progress:
        s = result["summary"]
        print(f"wrote {args.out} in {result['settings']['wall_s']:.0f} s; Pearson with Shapley: "
              + ", ".join(f"{m} {s[m]['mean']:.4f} +- {s[m]['std']:.4f}" for m in PROXIES))
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
