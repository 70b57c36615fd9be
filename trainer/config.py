"""The configuration schema, and loading it from conf/ plus command-line overrides.

Order of precedence, lowest first: the dataclass defaults below, ``conf/config.yaml``,
``conf/experiment/<NAME>.yaml`` (picked with ``experiment=NAME``), then ``key=value`` overrides
(OmegaConf dotlist). Everything merges into ``OmegaConf.structured(Config)`` in struct mode, so a
misspelt key or a wrong type fails at start-up naming the key, never hours into a run.

The config stops here and in ``cli.py``: every other module takes plain arguments.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

BACKENDS = ("auto", "dali_gpu", "dali_cpu", "torchvision", "synthetic")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class DataConfig:
    root: str = MISSING  # ImageNet-layout tree: ROOT/train/<wnid>/*.JPEG, ROOT/val/<wnid>/*.JPEG
    backend: str = "auto"  # one of BACKENDS; auto = dali_gpu > dali_cpu > torchvision
    batch_size: int = 256  # per device
    image_size: int = 224  # training crop and validation centre crop
    val_resize: int = 256  # validation: shorter side resized to this, then centre crop
    num_workers: int = 8  # DataLoader workers, or DALI threads, per device
    filelist_cache: bool = True  # reuse the tree's file list between runs (large trees)
    synthetic_size: int = 1281167  # images per epoch for backend=synthetic (timing the model)


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # see trainer.models.ARCHS
    num_classes: Optional[int] = None  # None: the number of class folders in the data
    zero_init_residual: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the model


@dataclass
class OptimConfig:
    lr: float = 0.256  # per 256 images; the run uses lr * global_batch / 256
    momentum: float = 0.875
    nesterov: bool = False
    weight_decay: float = 3.0517578125e-05  # never on BatchNorm parameters or biases
    label_smoothing: float = 0.1
    warmup_epochs: float = 8.0  # linear warmup, then cosine to zero, stepped per iteration


@dataclass
class TrainerConfig:
    max_epochs: int = 90
    accelerator: str = "auto"
    devices: Any = "auto"  # per node: an int, or "auto" (under srun: SLURM's tasks per node)
    num_nodes: Optional[int] = None  # None: SLURM's node count under srun, else 1
    precision: str = "32-true"
    log_every_n_steps: int = 50
    check_val_every_n_epoch: int = 1
    limit_train_batches: Optional[float] = None  # a fraction, or a count when > 1
    limit_val_batches: Optional[float] = None
    gradient_clip_val: Optional[float] = None
    deterministic: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/${model.arch}"  # config.yaml, checkpoints/, summary.json land here
    resume: bool = True  # fit again on the same run.dir continues from checkpoints/last.ckpt
    # Resume although the world size, global batch or trainer.max_epochs differ from the
    # checkpoint's (a warning says what is re-derived); false: such a resume is an error.
    allow_resume_change: bool = False
    keep_hpc_checkpoints: Optional[int] = 2  # newest preemption checkpoints (hpc_ckpt_N) kept; None: all
    # Debugging: append every trained batch's labels, per rank, to PATH.rank<R>.jsonl (see README).
    record_samples: Optional[str] = None


@dataclass
class WandbConfig:
    project: str = "imagenet-trainer"
    entity: Optional[str] = None  # None: the API key's default entity
    name: Optional[str] = None  # None: run.dir's folder name
    group: Optional[str] = None  # None: $SLURM_JOB_ID when the job runs under SLURM
    tags: list[str] = field(default_factory=list)
    # online | offline | disabled. online falls back to offline (said once) when no API key is
    # configured or WANDB_MODE=offline is set; offline runs are uploaded later with `wandb sync`.
    mode: str = "online"
    log_model: Any = True  # checkpoints as artifacts (online only): true = best + last at the end, "all", false


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)  # metrics.csv in run.dir is always written too


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    experiment: Optional[str] = None  # the recipe this config was built from, for the record


class ConfigError(ValueError):
    """A config problem the user must fix; the CLI prints it and exits with code 2."""


def conf_dir() -> Path:
    """The shipped ``conf/`` folder: package data when installed, the repo's in a checkout."""
    try:
        path = Path(str(importlib.resources.files("trainer.conf")))
        if (path / "config.yaml").is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "conf"


def experiments() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


def _allowed_keys(node: Any, prefix: str) -> str:
    keys = [f"{prefix}{k}" for k in node.keys()] if isinstance(node, DictConfig) else []
    return ", ".join(keys)


def _explain(err: OmegaConfBaseException, base: DictConfig) -> str:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        prefix = f"{parent}." if parent else ""
        return f"unknown config key {key!r}; allowed keys here: {_allowed_keys(node, prefix)}"
    msg = str(err).splitlines()[0]
    return f"bad value for config key {key!r}: {msg}"


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_explain(err, base)}") from None


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the config from conf/ and ``key=value`` overrides, then validate it."""
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. data.batch_size=64)")
    experiment = None
    rest = []
    for item in overrides:
        key, value = item.split("=", 1)
        if key == "experiment":
            experiment = value
        else:
            rest.append(item)

    base_file = conf_dir() / "config.yaml"
    cfg = _merge(schema(), OmegaConf.load(base_file), str(base_file))
    if experiment:
        path = conf_dir() / "experiment" / f"{experiment}.yaml"
        if not path.is_file():
            raise ConfigError(f"experiment={experiment!r} is unknown; choose one of: {', '.join(experiments())}")
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
        cfg.experiment = experiment
    cfg = apply_overrides(cfg, rest)
    validate(cfg)
    return cfg


def schema() -> DictConfig:
    """The dataclass defaults, in struct mode: unknown keys and wrong types are errors."""
    cfg = OmegaConf.structured(Config)
    OmegaConf.set_struct(cfg, True)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with OmegaConf dotlist ``key=value`` overrides merged in (ConfigError on bad ones)."""
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"could not parse overrides {list(overrides)}: {err}") from None
    return _merge(cfg, dotlist, "command line")


def from_saved(saved: dict, source: str) -> DictConfig:
    """A config saved with a run (a checkpoint's), checked against today's schema."""
    return _merge(schema(), saved, source)


def validate(cfg: DictConfig) -> None:
    """Checks the schema cannot express: choices, ranges, interpolations that resolve."""
    from trainer.models import ARCHS  # light import: torch is already needed by every verb

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, cfg)) from None

    def choice(key: str, allowed: tuple[str, ...] | list[str]) -> None:
        value = OmegaConf.select(cfg, key)
        if str(value) not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")

    def positive(key: str) -> None:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive")

    choice("data.backend", BACKENDS)
    choice("model.arch", list(ARCHS))
    choice("trainer.precision", PRECISIONS)
    choice("trainer.accelerator", ACCELERATORS)
    choice("logger.wandb.mode", WANDB_MODES)
    if cfg.logger.wandb.log_model not in (True, False, "all"):
        raise ConfigError(f"logger.wandb.log_model={cfg.logger.wandb.log_model!r} must be true, false or all")
    for key in ("data.batch_size", "data.image_size", "data.val_resize", "optim.lr", "trainer.max_epochs",
                "trainer.num_nodes", "model.num_classes", "trainer.log_every_n_steps", "run.keep_hpc_checkpoints"):
        positive(key)
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be 0 or more")
    if cfg.data.val_resize < cfg.data.image_size:
        raise ConfigError(
            f"data.val_resize={cfg.data.val_resize} is smaller than data.image_size={cfg.data.image_size}; "
            f"the centre crop must fit inside the resized image"
        )
    if not 0 <= cfg.optim.label_smoothing < 1:
        raise ConfigError(f"optim.label_smoothing={cfg.optim.label_smoothing} must be in [0, 1)")
    if cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} must be 0 or more")
    devices = cfg.trainer.devices
    if not (devices == "auto" or (isinstance(devices, int) and devices > 0)):
        raise ConfigError(f"trainer.devices={devices!r} must be a positive int or 'auto'")


def require_data_root(cfg: DictConfig) -> str:
    """``data.root``, or a ConfigError saying how to set it."""
    try:
        return cfg.data.root
    except MissingMandatoryValue:
        raise ConfigError(
            "data.root is not set: pass data.root=/path/to/imagenet (ROOT/train/<wnid>/*.JPEG), "
            "or make sample data with `imagenet-trainer sample-data DIR`"
        ) from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
