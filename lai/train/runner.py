"""Runners: build everything a config names, then train. ``run_experiment`` is what ``run.py``
(and the demo, and the tests) call."""
from __future__ import annotations

import json
import os
import random
import time
import traceback
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lai.config import part_options, validate
from lai.curate import plan_estimator
from lai.errors import ConfigError, RunInterrupted
from lai.data import build_data, needs_tokenizer, resolve_data_dir
from lai.estimators.registry import build_estimator
from lai.models import build_model, build_tokenizer
from lai.policies import POLICIES
from lai.policies.matching import is_path
from lai.train.checkpoints import load_checkpoint
from lai.train.loop import Trainer, peak_memory_mb
from lai.data.checksums import verify_files
from lai.data.registry import dataset_folders
from lai.train.distributed import init_from_env
from lai.train.records import (NullRecorder, RunRecorder, completed_summary, config_hash,
                               lock_run_dir, run_dir_for)
from lai.train.two_round import run_two_round


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _input_shape(data) -> tuple | None:
    inputs = data.train.inputs
    return tuple(inputs.shape[1:]) if torch.is_tensor(inputs) else None


def _wandb_run(cfg: DictConfig, run_dir):
    if cfg.logger.name != "wandb":
        return None
    try:
        import wandb
    except ImportError as e:  # pragma: no cover - wandb is a declared dependency
        raise ConfigError("logger=wandb needs the wandb package (pip install wandb)") from e
    return wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=cfg.logger.mode,
                      dir=str(run_dir), config=OmegaConf.to_container(cfg, resolve=True),
                      name=run_dir.name, reinit=True)


def _output_size(model: torch.nn.Module) -> int | None:
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return heads[-1].out_features if heads else None


def check_classes(cfg: DictConfig, model: torch.nn.Module, data) -> None:
    """A model built (or configured, ``model.num_classes``) for N classes on a dataset with M
    classes is a :class:`ConfigError`, raised before anything is trained."""
    if data.task != "classification":
        return
    want = cfg.model.get("num_classes")
    if want is not None and int(want) != data.num_classes:
        raise ConfigError(f"model.num_classes={want} but dataset {cfg.dataset.name} has "
                          f"{data.num_classes} classes; remove the override or set it to "
                          f"{data.num_classes}")
    out = _output_size(model)
    if out is not None and out != data.num_classes:
        raise ConfigError(f"model {cfg.model.name} has a {out}-way output layer but dataset "
                          f"{cfg.dataset.name} has {data.num_classes} classes")


def method_label(cfg: DictConfig) -> str:
    """The run folder's method name: ``run_name``, else the estimator's name; a random-drop
    control is ``random-<matched method>`` (``random-matched`` for a matched run folder,
    ``random-p<keep_fraction>`` unmatched), prefixed ``<estimator>-`` when one is scoring."""
    if cfg.run_name:
        return str(cfg.run_name)
    if cfg.policy.name != "random":
        return str(cfg.estimator.name)
    match = cfg.policy.get("match")
    tag = (f"p{float(cfg.policy.keep_fraction):g}" if match is None
           else "matched" if is_path(str(match)) else str(match))
    prefix = "" if cfg.estimator.name == "vanilla" else f"{cfg.estimator.name}-"
    return f"{prefix}random-{tag}"


@contextmanager
def config_errors() -> Iterator[None]:
    """A ValueError or TypeError raised while the run's parts are built from the config (a
    model that does not fit the data, a module name that is not in the model, a split
    larger than the data, ...) is the config's fault: a one-line :class:`ConfigError`, not
    a traceback. Errors while training are not converted."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def _online_parts(cfg: DictConfig, model: torch.nn.Module, data_parallel: bool):
    """The online estimator and policy the config names, set up for ``model`` now (LAI's
    layers and output layer, Ghost's form, the data-parallel cache), before anything is
    trained: what does not fit is a ValueError here."""
    est_opts, pol_opts = part_options(cfg)
    estimator = build_estimator(est_opts)
    policy = POLICIES.build(pol_opts)
    if data_parallel:
        estimator.prepare_data_parallel()
    plan_estimator(estimator, model, cfg.trainer.strategy, policy)  # refused now, not later
    estimator.check_model(model)
    policy.prepare(cfg)  # e.g. the random control reads its matched run's record
    return estimator, policy


def run_experiment(cfg: DictConfig) -> dict:
    """Run one experiment from a composed config; returns the summary (also on disk).

    Raises :class:`ConfigError` / :class:`lai.data.MissingDataError` /
    :class:`lai.data.checksums.CorruptDataError` before anything is trained when the config
    or the data is wrong. The run folder is named by the config's hash: a completed run is
    not redone (its summary is returned), an interrupted one resumes from its checkpoint.
    """
    validate(cfg)
    device = resolve_device(cfg.device)
    ranks = init_from_env(device)  # torchrun: data-parallel (lai/train/distributed.py)
    if ranks.enabled:
        check_data_parallel(cfg, ranks.world)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    identity = config_hash(cfg)
    run_dir = run_dir_for(cfg.results_dir, cfg.dataset.name, method_label(cfg),
                          seed=cfg.seed, identity=identity)
    done = completed_summary(run_dir)
    if done is not None:
        print(f"already completed: {run_dir}", flush=True)
        return done
    seed_everything(cfg.seed)
    data_dir = resolve_data_dir(cfg.data_dir)
    verify_files(data_dir, dataset_folders(cfg.dataset.name))
    with config_errors():
        tokenizer = build_tokenizer(cfg.model.tokenizer, cfg.model) \
            if needs_tokenizer(cfg.dataset.name) else None
        t0 = time.perf_counter()
        data = build_data(cfg.dataset, data_dir=data_dir, seed=cfg.seed, tokenizer=tokenizer)
        data_time = time.perf_counter() - t0

    def make_model() -> torch.nn.Module:
        seed_everything(cfg.seed)  # the same initialisation for every model a run builds
        return build_model(cfg.model, task=data.task, num_classes=data.num_classes,
                           input_shape=_input_shape(data),
                           vocab_size=len(tokenizer) if tokenizer is not None else None,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None)).to(device)

    two_round = cfg.runner.name == "two_round"
    with config_errors():
        model = make_model()
        check_classes(cfg, model, data)
        estimator, policy = (None, None) if two_round else \
            _online_parts(cfg, model, ranks.enabled)
    n_params = sum(p.numel() for p in model.parameters())
    if two_round:
        model = None  # each round builds its own
    if ranks.rank != 0:  # rank 0 writes the run folder; the others train alongside
        return _run_in(cfg, run_dir, identity, data, data_time, model, n_params, make_model,
                       device, estimator, policy, record=False)
    lock = lock_run_dir(run_dir)  # held until this process ends
    try:
        # again under the lock: an identical job may have finished since the check above
        # (training it again would cut its metrics.jsonl under a "completed" summary)
        done = completed_summary(run_dir)
        if done is not None:
            print(f"already completed: {run_dir}", flush=True)
            return done
        return _run_in(cfg, run_dir, identity, data, data_time, model, n_params, make_model,
                       device, estimator, policy)
    finally:
        lock.close()


def check_data_parallel(cfg: DictConfig, world: int) -> None:
    """What a data-parallel (torchrun) run supports besides the estimator's own
    :meth:`~lai.estimators.base.OnlineEstimator.prepare_data_parallel`: ConfigError
    otherwise."""
    if cfg.runner.name != "online":
        raise ConfigError(f"runner={cfg.runner.name} runs in one process; torchrun with "
                          f"{world} processes supports runner=online")
    if cfg.trainer.strategy != "one_pass" and cfg.estimator.name != "vanilla":
        raise ConfigError("data-parallel runs need trainer.strategy=one_pass")


def _run_in(cfg, run_dir, identity, data, data_time, model, n_params, make_model, device,
            estimator, policy, record: bool = True) -> dict:
    two_round = model is None
    ckpt = run_dir / "checkpoint.pt"
    resume = None if two_round else load_checkpoint(ckpt)
    recorder = RunRecorder(run_dir, cfg, _wandb_run(cfg, run_dir),
                           metrics_bytes=resume["metrics_bytes"] if resume else 0) \
        if record else NullRecorder()
    info = {"run_dir": str(run_dir), "device": str(device), "torch": torch.__version__,
            "data": data.info, "n_train": len(data.train), "n_val": len(data.val),
            "n_test": len(data.test), "n_params": n_params,
            "data_build_s": data_time, "config_hash": identity,
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if data.noisy is not None:
        info["train_noise_rate"] = float(np.mean(data.noisy))
    recorder.log("resume" if resume else "start", **info,
                 **({"from_epoch": json.loads(resume["loop"])["next_epoch"]} if resume else {}))
    if resume and record:
        print(f"resuming {run_dir} from its checkpoint", flush=True)
    try:
        if two_round:
            summary = run_two_round(cfg, data, make_model, device, recorder)
        else:
            trainer = Trainer(model, data, estimator, policy, cfg.trainer, cfg.estimator,
                              device, recorder, seed=cfg.seed, save_scores=cfg.save_scores,
                              checkpoint_path=ckpt, resume_state=resume)
            summary = trainer.fit()
    except BaseException as e:  # keep what was measured; re-raise for the caller to see
        peak, kind = peak_memory_mb(device)
        if isinstance(e, RunInterrupted):
            e.run_dir = str(run_dir)
        status = "interrupted" if isinstance(e, RunInterrupted) else "failed"
        recorder.summary(status=status, error=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc(), peak_memory_mb=peak,
                         peak_memory_kind=kind, **{k: v for k, v in info.items() if k != "data"})
        recorder.close()
        raise
    result = recorder.summary(dataset=cfg.dataset.name, method=method_label(cfg),
                              model=cfg.model.name,
                              estimator=cfg.estimator.name, policy=cfg.policy.name,
                              runner=cfg.runner.name, seed=cfg.seed, **summary,
                              **(policy.record() if policy is not None else {}),
                              **{k: v for k, v in info.items() if k != "data"})
    recorder.close()
    if record:
        ckpt.unlink(missing_ok=True)  # completed: summary.json is the record from now on
    return result
