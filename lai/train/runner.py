"""Runners: build everything a config names, then train. ``run_experiment`` is what ``run.py``
(and the demo, and the tests) call."""
from __future__ import annotations

import random
import time
import traceback

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lai.config import ConfigError, validate
from lai.data import build_data, needs_tokenizer, resolve_data_dir
from lai.estimators.registry import build_estimator
from lai.models import build_model, build_tokenizer
from lai.policies import build_policy_from_config
from lai.train.loop import Trainer, peak_memory_mb
from lai.train.records import RunRecorder, make_run_dir
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


def run_experiment(cfg: DictConfig) -> dict:
    """Run one experiment from a composed config; returns the summary (also on disk).

    Raises :class:`ConfigError` / :class:`lai.data.MissingDataError` before anything is
    trained when the config or the data is wrong.
    """
    validate(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data_dir = resolve_data_dir(cfg.data_dir)
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
    model = make_model()
    if not two_round:
        estimator = build_estimator(cfg.estimator.name, layers=cfg.estimator.layers,
                                    output_layer=cfg.estimator.output_layer,
                                    cache=cfg.estimator.cache)
        policy = build_policy_from_config(cfg.policy)

    run_dir = make_run_dir(cfg.results_dir, cfg.dataset.name, cfg.run_name or cfg.estimator.name,
                           seed=cfg.seed)
    recorder = RunRecorder(run_dir, cfg, _wandb_run(cfg, run_dir))
    info = {"run_dir": str(run_dir), "device": str(device), "torch": torch.__version__,
            "data": data.info, "n_train": len(data.train), "n_val": len(data.val),
            "n_test": len(data.test), "n_params": sum(p.numel() for p in model.parameters()),
            "data_build_s": data_time}
    if data.noisy is not None:
        info["train_noise_rate"] = float(np.mean(data.noisy))
    recorder.log("start", **info)
    try:
        if two_round:
            del model  # each round builds its own
            summary = run_two_round(cfg, data, make_model, device, recorder)
        else:
            trainer = Trainer(model, data, estimator, policy, cfg.trainer, cfg.estimator,
                              device, recorder, seed=cfg.seed, save_scores=cfg.save_scores)
            summary = trainer.fit()
    except BaseException as e:  # keep what was measured; re-raise for the caller to see
        peak, kind = peak_memory_mb(device)
        recorder.summary(status="failed", error=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc(), peak_memory_mb=peak,
                         peak_memory_kind=kind, **{k: v for k, v in info.items() if k != "data"})
        recorder.close()
        raise
    result = recorder.summary(dataset=cfg.dataset.name, model=cfg.model.name,
                              estimator=cfg.estimator.name, policy=cfg.policy.name,
                              runner=cfg.runner.name, seed=cfg.seed, **summary, **{k: v for k, v in info.items()
                                                           if k != "data"})
    recorder.close()
    return result
