"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every config group has one dataclass here; the YAML files in ``conf/<group>/`` set values
for it. A key that is not in the dataclass, or a value of the wrong type, fails when Hydra
composes the config, before any data is loaded. Value checks that types cannot express
(``val_fraction`` in (0, 1], a known dataset name, ...) live in :func:`validate`, which
``run.py`` calls before training and which raises :class:`ConfigError` with a one-line message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lai.errors import ConfigError  # noqa: F401  (raised by validate; lives with the other errors)
from lai.estimators.registry import EstimatorOptions
from lai.policies.registry import PolicyOptions

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class DatasetConfig:
    """Which data, how much of it, and how its validation split and label noise are made."""

    name: str = MISSING  # a key of lai.data.registry.DATASETS, e.g. cifar10n_worst, digits_n
    train_limit: Optional[int] = None  # cap on training samples (seeded subset), None = all
    val_size: float = 0.1  # clean held-out validation: fraction (<1) or count (>=1) of train pool
    val_source: str = "holdout"  # holdout (clean split of train) | split (dataset's own val split)
    val_limit: Optional[int] = None  # cap on validation samples
    test_limit: Optional[int] = None  # cap on test samples
    noise: str = "default"  # cifar-n: human | paper_code ; text: symmetric | paper_code | none
    noise_rate: float = 0.4  # symmetric noise rate (text / digits)
    max_length: int = 128  # tokens per text sample (truncation)
    block_size: int = 128  # tokens per language-modelling block (pile)
    augment: bool = True  # random crop + flip for vision training batches
    download: bool = True  # allow torchvision / HF datasets downloads when files are absent


@dataclass
class ModelConfig:
    """Which network. ``name`` picks the builder; unused fields are ignored by a builder."""

    name: str = MISSING  # resnet18 | bert | gpt_neo | mlp | small_cnn | tiny_transformer
    stem: str = "imagenet"  # resnet18: imagenet (paper's code: 7x7/2 conv + maxpool) | cifar
    preset: Optional[str] = None  # bert/gpt_neo: tiny (random init, no download) | minilm | ...
    name_or_path: Optional[str] = None  # Hugging Face model id or local folder (pretrained)
    tokenizer: Optional[str] = None  # bytes | a HF tokenizer id/folder; None = model's own
    hidden: int = 128  # small models: width
    depth: int = 2  # small models: hidden layers / transformer blocks
    num_layers: Optional[int] = None  # pretrained BERT: keep only the first k encoder layers
    dropout: float = 0.0
    num_classes: Optional[int] = None  # optional check: must equal the dataset's class count
    # bert: attn_implementation, eager | sdpa (fused kernels; every estimator handles both);
    # gpt_neo has eager attention only
    attention: str = "eager"
    # bert (pretrained): cls = the pooler's [CLS] vector (BertForSequenceClassification) |
    # mean = the masked mean of the last hidden states (sentence encoders such as MiniLM)
    pooling: str = "cls"


@dataclass
class RunnerConfig:
    """``online``: one run with online valuation. ``two_round``: train, score every training
    sample with a static estimator, drop those with value < threshold, retrain from scratch."""

    name: str = "online"  # online | two_round
    threshold: float = 0.0  # two_round: remove samples with value < threshold


@dataclass
class TrainerConfig:
    """The optimisation loop (paper App. D defaults live in conf/trainer/*.yaml)."""

    epochs: int = 1
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"  # constant | cosine | linear (per step, after warm-up) |
    # warm_restarts (per epoch: cosine cycles of restart_epochs, restart_mult x longer each)
    restart_epochs: int = 10  # warm_restarts: the first cycle's length in epochs (T_0)
    restart_mult: int = 2  # warm_restarts: each cycle this many times the last one (T_mult)
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    max_steps: Optional[int] = None  # stop after this many optimizer steps (all epochs)
    strategy: str = "one_pass"  # one_pass: score from the training forward, masked backward;
    # two_pass: no-grad scoring forward, then forward+backward on the kept samples only
    eval_every_epoch: bool = True
    eval_at_steps: List[int] = field(default_factory=list)  # also evaluate after these steps
    num_workers: int = 0
    progress: bool = True
    # speed (none of these changes what is computed in fp32; see lai/train/accel.py)
    precision: str = "fp32"  # fp32 | bf16: forwards under torch.autocast(bfloat16); losses,
    # values and the validation cache stay fp32
    channels_last: Any = "auto"  # true | false | auto (= on for models with Conv2d on CUDA)
    compile: bool = False  # torch.compile the forwards that carry no estimator hooks (vanilla
    # steps, two_pass's second pass, evaluation); hooked forwards run the eager model
    log_every: int = 50  # one "step" record line per this many steps; per-step statistics
    # stay on the device in between (no host sync per step)
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps inside an epoch (0: at
    # epoch ends only); a resumed run goes on from the last one


@dataclass
class LoggerConfig:
    name: str = "jsonl"  # jsonl | wandb (jsonl records are always written)
    project: str = "lai"
    entity: Optional[str] = None
    mode: str = "offline"  # wandb mode: online | offline | disabled


@dataclass
class Config:
    """The root config (conf/config.yaml sets the defaults list)."""

    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    # typed per estimator / policy: the group's option picks its dataclass (registries)
    estimator: EstimatorOptions = field(default_factory=EstimatorOptions)
    policy: PolicyOptions = field(default_factory=PolicyOptions)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data_dir: Optional[str] = None  # else $LAI_DATA, else ~/.cache/lai
    results_dir: str = "results/runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    run_name: Optional[str] = None  # method folder name; default the estimator (runner.method_label)
    save_scores: bool = False  # write per-sample values and keep decisions per epoch
    extra: Any = None  # free-form user notes, copied into the record


def register_configs() -> None:
    """Register the schemas so that ``conf/**.yaml`` files are validated against them: one
    per group, and one per registered estimator and policy (``<name>_schema``, which its
    YAML file names in its defaults list; a plug-in without a YAML file is stored under its
    own name, so ``estimator=<name>`` works without one)."""
    from lai.estimators import ESTIMATORS
    from lai.policies import POLICIES

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [("dataset", DatasetConfig), ("model", ModelConfig),
                        ("runner", RunnerConfig), ("trainer", TrainerConfig),
                        ("logger", LoggerConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    for group, registry in (("estimator", ESTIMATORS), ("policy", POLICIES)):
        for entry in registry:
            node = entry.options(name=entry.name)
            cs.store(group=group, name=f"{entry.name}_schema", node=node)
            if not (CONF_DIR / group / f"{entry.name}.yaml").is_file():
                cs.store(group=group, name=entry.name, node=node)


# ---- value checks that types cannot express ----------------------------------------------
# (the estimator's and the policy's own options are checked by their dataclasses)
_CHOICES = {
    "trainer.strategy": ("one_pass", "two_pass"),
    "runner.name": ("online", "two_round"),
    "trainer.optimizer": ("sgd", "adam", "adamw"),
    "trainer.schedule": ("constant", "cosine", "linear", "warm_restarts"),
    "logger.name": ("jsonl", "wandb"),
    "dataset.val_source": ("holdout", "split"),
    "trainer.precision": ("fp32", "bf16"),
    "model.attention": ("eager", "sdpa"),
    "model.pooling": ("cls", "mean"),
    "model.stem": ("imagenet", "cifar"),
    "logger.mode": ("online", "offline", "disabled"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def part_options(cfg: Any) -> tuple[Any, Any]:
    """``(estimator options, policy options)``: the dataclass instances ``cfg.estimator``
    and ``cfg.policy`` describe, checked; a bad name or value is a :class:`ConfigError`."""
    from lai.estimators.registry import estimator_options
    from lai.policies.registry import POLICIES
    from lai.plugins import options_from_config

    out = []
    for group, make in (("estimator", estimator_options),
                        ("policy", lambda node: options_from_config(node, POLICIES))):
        try:
            out.append(make(cfg[group]))
        except (TypeError, ValueError) as e:
            message = str(e).splitlines()[0]
            raise ConfigError(message if message.startswith(f"{group}.")
                              else f"{group}: {message}") from None
    return out[0], out[1]


def validate(cfg: Any) -> None:
    """Raise :class:`ConfigError` (one line) for values that compose but cannot work."""
    from lai.data.registry import DATASETS
    from lai.models.registry import MODELS

    for key, allowed in _CHOICES.items():
        val = _get(cfg, key)
        if val not in allowed:
            raise ConfigError(f"{key}={val!r} is not one of: {', '.join(allowed)}")
    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"dataset.name={cfg.dataset.name!r} is unknown; known: "
                          f"{', '.join(sorted(DATASETS))}")
    if cfg.model.name not in MODELS:
        raise ConfigError(f"model.name={cfg.model.name!r} is unknown; known: "
                          f"{', '.join(sorted(MODELS))}")
    _check_parts(cfg)
    _check_values(cfg)


def _check_parts(cfg: Any) -> None:
    """The estimator's and the policy's options, and what they need of each other and of
    the other groups."""
    from lai.estimators.registry import ESTIMATORS, static_names
    from lai.policies.registry import POLICIES

    est_opts, pol_opts = part_options(cfg)
    est, pol = est_opts.name, pol_opts.name
    static = ESTIMATORS.get(est).kind == "static"
    if static != (cfg.runner.name == "two_round"):
        raise ConfigError(f"estimator={est} is {'static' if static else 'online'}: use "
                          f"runner={'two_round' if static else 'online'} "
                          f"(static: {', '.join(static_names())})")
    for a, b in ((ESTIMATORS.get(est), "policy"), (POLICIES.get(pol), "estimator")):
        wants = a.meta.get(b)  # a part that only works with one of the other kind
        if wants is not None and cfg[b].name != wants:
            raise ConfigError(f"{'estimator' if b == 'policy' else 'policy'}={a.name} needs "
                              f"{b}={wants}; got {b}={cfg[b].name}")
    try:
        POLICIES.build(pol_opts)  # the policy's own checks of its values
    except (TypeError, ValueError) as e:
        raise ConfigError(f"policy: {str(e).splitlines()[0]}") from None
    if est_opts.curation().get("precondition", "none") == "adam" and \
            cfg.trainer.optimizer not in ("adam", "adamw"):
        raise ConfigError("estimator.precondition=adam needs trainer.optimizer=adam or adamw")


def _check_values(cfg: Any) -> None:
    """Ranges of the trainer's, model's and dataset's numbers."""
    checks = [
        (cfg.trainer.epochs >= 1, "trainer.epochs must be >= 1"),
        (cfg.trainer.batch_size >= 1, "trainer.batch_size must be >= 1"),
        (cfg.trainer.eval_batch_size >= 1, "trainer.eval_batch_size must be >= 1"),
        (cfg.trainer.lr > 0, "trainer.lr must be > 0"),
        (cfg.trainer.max_steps is None or cfg.trainer.max_steps >= 1,
         "trainer.max_steps must be >= 1"),
        (cfg.trainer.warmup_steps >= 0, "trainer.warmup_steps must be >= 0"),
        (cfg.trainer.get("restart_epochs", 10) >= 1 and cfg.trainer.get("restart_mult", 2) >= 1,
         "trainer.restart_epochs and trainer.restart_mult must be >= 1"),
        (cfg.trainer.log_every >= 1, "trainer.log_every must be >= 1"),
        (cfg.trainer.get("checkpoint_every", 0) >= 0, "trainer.checkpoint_every must be >= 0"),
        (all(int(s) >= 1 for s in cfg.trainer.eval_at_steps),
         "trainer.eval_at_steps must be steps >= 1"),
        (cfg.model.get("num_classes") is None or cfg.model.num_classes >= 1,
         "model.num_classes must be >= 1"),
        (cfg.model.get("num_layers") is None or cfg.model.num_layers >= 1,
         "model.num_layers must be >= 1"),
        (len(cfg.trainer.betas) == 2 and all(0 <= b < 1 for b in cfg.trainer.betas),
         "trainer.betas must be two values in [0, 1)"),
        (cfg.trainer.momentum >= 0, "trainer.momentum must be >= 0"),
        (cfg.trainer.weight_decay >= 0, "trainer.weight_decay must be >= 0"),
        (cfg.trainer.eps > 0, "trainer.eps must be > 0"),
        (cfg.trainer.grad_clip is None or cfg.trainer.grad_clip > 0,
         "trainer.grad_clip must be > 0 (or null: no clipping)"),
        (cfg.trainer.num_workers >= 0, "trainer.num_workers must be >= 0"),
        (cfg.model.hidden >= 1, "model.hidden must be >= 1"),
        (cfg.model.depth >= 0, "model.depth must be >= 0"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (cfg.dataset.val_limit is None or cfg.dataset.val_limit >= 1,
         "dataset.val_limit must be >= 1 (or null: all)"),
        (cfg.dataset.test_limit is None or cfg.dataset.test_limit >= 1,
         "dataset.test_limit must be >= 1 (or null: all)"),
        (cfg.dataset.max_length >= 1 and cfg.dataset.block_size >= 1,
         "dataset.max_length and dataset.block_size must be >= 1"),
        (cfg.dataset.train_limit is None or cfg.dataset.train_limit >= 1,
         "dataset.train_limit must be >= 1"),
        (cfg.dataset.val_size > 0, "dataset.val_size must be > 0"),
        (0 <= cfg.dataset.noise_rate < 1, "dataset.noise_rate must be in [0, 1)"),
        (cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda"),
         f"device={cfg.device!r} is not one of: auto, cpu, cuda, cuda:N"),
    ]
    cl = cfg.trainer.channels_last
    if not (isinstance(cl, bool) or cl == "auto"):
        raise ConfigError(f"trainer.channels_last={cl!r} is not one of: true, false, auto")
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
