"""Typed configuration schemas, registered in Hydra's ConfigStore.

Every config group has one dataclass here; the YAML files in ``conf/<group>/`` set values
for it. A key that is not in the dataclass, or a value of the wrong type, fails when Hydra
composes the config, before any data is loaded. Value checks that types cannot express
(``val_fraction`` in (0, 1], a known dataset name, ...) live in :func:`validate`, which
``run.py`` calls before training and which raises :class:`ConfigError` with a one-line message.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lai.errors import ConfigError  # noqa: F401  (raised by validate; lives with the other errors)


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
class EstimatorConfig:
    """How each training sample is valued online (sign: positive = helps)."""

    name: str = "vanilla"  # vanilla | lai | lli
    layers: str = "all"  # lai layer set: all | code | lli
    val_fraction: float = 0.1  # fraction of the validation split drawn for each cache refresh
    val_max: Optional[int] = None  # cap on the validation samples per refresh
    refresh_every: int = 1  # rebuild the validation cache every N optimizer steps
    cache: str = "auto"  # auto | folded | pairwise (auto: folded when classes < |V|)
    val_mode: str = "eval"  # eval | train: module mode for the validation-cache forward
    output_layer: Optional[str] = None  # module name of the output layer; None = last nn.Linear
    self_influence: bool = False  # V = the current training batch (pre-training, no val set)
    precondition: str = "none"  # none | adam: score in Adam's preconditioned space (App. E)
    ghost_mode: str = "auto"  # ghost: auto | forward | probe (lai/estimators/ghost.py)
    release_tangents: bool = True  # ghost forward form: free unreachable tangents (tangents.py)
    # ghost forward form: constants without efficient-zero tangents, lean BN/softmax tangents
    forward_fastpaths: bool = True  # (forward_fastpaths.py; less host time and memory)
    offload: bool = False  # lai/lli: cache in host memory, prefetched per layer (for CUDA)
    # static estimators (runner=two_round): ip | lissa | datainf | trak
    damping: Optional[float] = None  # lissa: lambda (None -> 0.01); datainf: None = its rule
    lissa_scale: Optional[float] = None  # LiSSA: > the top eigenvalue of H + lambda I; None =
    # 1.5 x (a power-iteration estimate + lambda)
    lissa_depth: int = 100  # LiSSA recursion steps
    lissa_repeats: int = 1  # LiSSA independent repeats, averaged
    proj_dim: int = 2048  # TRAK projection dimension
    trak_checkpoints: int = 1  # TRAK ensemble: this many round-1 checkpoints (last epochs)
    hessian_samples: int = 1000  # lissa/datainf: training samples the curvature is taken from


@dataclass
class PolicyConfig:
    """What to do with the values: weights per sample (0/1 for filtering)."""

    name: str = "threshold"  # threshold | percentile | mean_std | reweight | spl | score_only
    # | random (the random-drop control)
    threshold: float = 0.0  # threshold: keep samples with value >= threshold
    start_epoch: int = 0  # warm-up: epochs (0-based) before this one train on every sample
    keep_fraction: float = 0.5  # percentile: keep the top q of each batch; random: keep each
    # sample with this probability (unless match is set)
    match: Optional[str] = None  # random: keep each sample with the kept fraction per epoch of
    # this run (a run folder, or a method name looked up in results_dir with the same config)
    k: float = 1.0  # mean_std: drop values below mean - k * std of the batch
    temperature: float = 1.0  # reweight: softmax temperature in units of the batch's std
    spl_start_fraction: float = 0.5  # spl: initial lambda = this quantile of the first losses
    spl_lambda: Optional[float] = None  # spl: initial lambda (loss threshold); None = quantile
    spl_growth: float = 1.1  # spl: lambda multiplied by this every epoch


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
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
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
    """Register the schemas so that ``conf/**.yaml`` files are validated against them."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [("dataset", DatasetConfig), ("model", ModelConfig),
                        ("estimator", EstimatorConfig), ("policy", PolicyConfig),
                        ("runner", RunnerConfig), ("trainer", TrainerConfig),
                        ("logger", LoggerConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=node)


# ---- value checks that types cannot express ----------------------------------------------
_CHOICES = {
    "estimator.name": ("vanilla", "lai", "lli", "ghost", "spl", "ip", "lissa", "datainf",
                       "trak"),
    "estimator.precondition": ("none", "adam"),
    "estimator.ghost_mode": ("auto", "forward", "probe"),
    "trainer.strategy": ("one_pass", "two_pass"),
    "estimator.cache": ("auto", "folded", "pairwise"),
    "estimator.val_mode": ("eval", "train"),
    "policy.name": ("threshold", "percentile", "mean_std", "reweight", "spl", "score_only",
                    "random"),
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


def _policy(cfg: Any) -> Any:
    """The policy object the config describes (its own checks raise ValueError)."""
    from lai.policies.factory import build_policy_from_config

    try:
        return build_policy_from_config(cfg.policy)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"policy: {e}") from None


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
    layers = cfg.estimator.layers
    if isinstance(layers, str) and layers not in ("all", "code", "lli"):
        raise ConfigError(f"estimator.layers={layers!r} is not one of: all, code, lli")
    if cfg.estimator.name == "lli" and layers not in ("all", "lli"):
        raise ConfigError("estimator=lli uses the output layer only; set estimator.layers only "
                          "with estimator=lai")
    est, pol = cfg.estimator.name, cfg.policy.name
    static = est in ("ip", "lissa", "datainf", "trak")
    if static != (cfg.runner.name == "two_round"):
        raise ConfigError(f"estimator={est} is {'static' if static else 'online'}: use "
                          f"runner={'two_round' if static else 'online'} "
                          "(static: ip, lissa, datainf, trak)")
    if (est == "spl") != (pol == "spl"):
        raise ConfigError("estimator=spl and policy=spl go together (SPL's value is -loss); "
                          f"got estimator={est} policy={pol}")
    _policy(cfg)  # the policy's own checks (ranges of its options), as ConfigErrors
    if cfg.policy.get("match") is not None and pol != "random":
        raise ConfigError(f"policy.match applies to policy=random (the random-drop control), "
                          f"not policy={pol}")
    if cfg.estimator.precondition == "adam" and cfg.trainer.optimizer not in ("adam", "adamw"):
        raise ConfigError("estimator.precondition=adam needs trainer.optimizer=adam or adamw")
    if cfg.estimator.ghost_mode == "probe" and est == "ghost" and not (
            cfg.trainer.strategy == "one_pass" and _policy(cfg).keeps_all_unweighted):
        raise ConfigError("estimator.ghost_mode=probe gives values only after the backward: it "
                          "needs trainer.strategy=one_pass and a policy that keeps every sample "
                          "(policy=score_only); use ghost_mode=auto or forward to filter")
    if cfg.estimator.get("offload", False) and est not in ("lai", "lli"):
        raise ConfigError(f"estimator.offload keeps LAI's validation cache on the host: it "
                          f"applies to lai and lli, not {est}")
    if (cfg.estimator.precondition == "adam" or cfg.estimator.self_influence) and \
            est not in ("lai", "lli", "ghost"):
        raise ConfigError("estimator.precondition / self_influence apply to lai, lli and ghost")
    checks = [
        (0 < cfg.estimator.val_fraction <= 1, "estimator.val_fraction must be in (0, 1]"),
        (cfg.estimator.refresh_every >= 1, "estimator.refresh_every must be >= 1"),
        (cfg.estimator.val_max is None or cfg.estimator.val_max >= 1,
         "estimator.val_max must be >= 1"),
        (cfg.estimator.damping is None or cfg.estimator.damping >= 0,
         "estimator.damping must be >= 0"),
        (cfg.estimator.lissa_depth >= 1 and cfg.estimator.lissa_repeats >= 1
         and (cfg.estimator.lissa_scale is None or cfg.estimator.lissa_scale > 0),
         "estimator.lissa_depth/repeats/scale must be > 0"),
        (cfg.estimator.proj_dim >= 1 and cfg.estimator.trak_checkpoints >= 1,
         "estimator.proj_dim and trak_checkpoints must be >= 1"),
        (cfg.estimator.hessian_samples >= 1, "estimator.hessian_samples must be >= 1"),
        (cfg.policy.start_epoch >= 0, "policy.start_epoch must be >= 0"),
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
