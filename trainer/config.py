"""The configuration schema, and loading it from conf/ plus command-line overrides.

Order of precedence, lowest first: the dataclass defaults below, ``conf/config.yaml``,
``conf/experiment/<NAME>.yaml`` (picked with ``experiment=NAME``), then ``key=value`` overrides
(OmegaConf dotlist). Everything merges into ``OmegaConf.structured(Config)`` in struct mode, so a
misspelt key or a wrong type fails at start-up naming the key, never hours into a run.

The config stops here and in ``cli.py``/``run.py``: every other module takes plain arguments or
the specs built here once from the validated config (``optim_spec`` ... ``aug_spec``).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from data_pipelines.resolution import ResolutionSchedule
from data_pipelines.specs import AugSpec, DataSpec
from trainer.recipe.specs import LossSpec, MixSpec, OptimSpec, ScheduleSpec

BACKENDS = ("auto", "dali_gpu", "dali_cpu", "torchvision", "synthetic")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
WANDB_MODES = ("online", "offline", "disabled")
FREEZES = ("none", "backbone")  # model.freeze


@dataclass
class ProgressiveConfig:
    # Progressive resizing (FFCV's rule): the training crop is start_size up to epoch start_epoch,
    # end_size from epoch end_epoch on (epochs from 0), linear in between, rounded to multiples of
    # 32 px. All null: off (data.image_size every epoch). Validation keeps data.val_image_size.
    start_size: Optional[int] = None
    end_size: Optional[int] = None
    start_epoch: Optional[int] = None
    end_epoch: Optional[int] = None
    step: int = 32  # px between the ramp's sizes (FFCV's 32)


@dataclass
class DataConfig:
    root: str = MISSING  # ImageNet-layout tree (ROOT/train/<wnid>/*.JPEG, ROOT/val/...) or a pack (ROOT/manifest.json)
    backend: str = "auto"  # one of BACKENDS; auto = dali_gpu > dali_cpu > torchvision
    batch_size: int = 256  # per device
    image_size: int = 224  # training crop (unless data.progressive), and validation's unless val_image_size
    val_resize: int = 256  # validation: shorter side resized to this, then centre crop
    val_image_size: Optional[int] = None  # validation centre crop; None: data.image_size
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    num_workers: int = 8  # DataLoader workers, or DALI threads, per device
    filelist_cache: bool = True  # reuse the tree's file list between runs (large trees)
    synthetic_size: int = 1281167  # images per epoch for backend=synthetic (timing the model)
    # A pack's shards copied to this node-local folder (e.g. $TMPDIR) at job start, once per node,
    # verified by sha256, and read from there (data_pipelines/staging.py); None: read data.root.
    stage_to: Optional[str] = None


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # see trainer.recipe.models.ARCHS
    num_classes: Optional[int] = None  # None: the number of class folders in the data
    zero_init_residual: bool = False
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    # Antialiased downsampling (FFCV, Composer): a 3x3 binomial blur before every strided conv with
    # >= 16 input channels, and max-pool then blur; no parameters added, state_dict keys unchanged.
    blurpool: bool = False
    sync_bn: bool = False  # under DDP, BatchNorm statistics over every rank's batch (SyncBatchNorm)
    # Fine-tuning (trainer/artifacts/finetune.py): weights loaded into the new network before
    # training (not a resume: no optimiser state, epoch 0). A torchvision state_dict (torch.save), a safetensors file,
    # or one of our checkpoints (.ckpt: its EMA when it has one) or exports. A different class count
    # re-initialises the classifier (fc); any other key that does not fit is an error.
    init_from: Optional[str] = None
    # none | backbone: everything but the classifier (fc) frozen: no gradients, and BatchNorm kept in
    # eval mode (its running statistics do not move).
    freeze: str = "none"
    # The classifier (fc) freshly initialised after init_from's weights are loaded (DINO's linear
    # probe: normal(0, 0.01), bias 0), so that a probe measures the features, not the trained head.
    reset_head: bool = False


@dataclass
class OptimConfig:
    name: str = "sgd"  # a key of trainer.recipe.optim.OPTIMIZERS: sgd | lars | lamb (timm's) | adamw
    # Per 256 images, for every optimiser; the run uses lr * effective batch / 256, where the
    # effective batch is data.batch_size x world size x trainer.accumulate_grad_batches.
    lr: float = 0.256
    momentum: float = 0.875  # sgd and lars
    nesterov: bool = False  # sgd and lars
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw and lamb
    eps: Optional[float] = None  # adamw, lamb, lars; None: the optimiser's own (1e-8; lamb 1e-6)
    trust_coeff: float = 0.001  # lars: eta of the layer-wise trust ratio (never on BN and biases)
    weight_decay: float = 3.0517578125e-05  # never on BatchNorm parameters or biases
    label_smoothing: float = 0.1
    warmup_epochs: float = 8.0  # linear warmup, then the schedule, stepped per iteration
    # A key of trainer.recipe.schedules.SCHEDULES: cosine to zero | linear to zero (FFCV) | step
    # (x gamma at each of milestones) | poly: (1 - progress) ** poly_power to zero (MLPerf's LARS).
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])  # schedule=step: epochs
    gamma: float = 0.1  # schedule=step: the lr's factor at each milestone
    poly_power: float = 2.0  # schedule=poly
    # schedule=linear: the epoch of the peak lr (FFCV's lr_peak_epoch), reached by one linear ramp
    # from zero; None: the end of warmup_epochs.
    peak_epoch: Optional[float] = None


@dataclass
class LossConfig:
    # ce: softmax cross-entropy | bce: a sigmoid per class (ResNet Strikes Back, Composer), summed
    # over the classes and averaged over the batch. Both smooth by optim.label_smoothing.
    name: str = "ce"


@dataclass
class TrainerConfig:
    max_epochs: int = 90
    accelerator: str = "auto"
    devices: Any = "auto"  # per node: an int, or "auto" (under srun: SLURM's tasks per node)
    num_nodes: Optional[int] = None  # None: SLURM's node count under srun, else 1
    precision: str = "32-true"
    log_every_n_steps: int = 50
    check_val_every_n_epoch: int = 1
    # Lightning's rule, by type: an int is a count of batches (1: one batch), a float a fraction in
    # [0, 1] (1.0: all). Any, not float: a float field would turn 1 into 1.0, i.e. every batch.
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    gradient_clip_val: Optional[float] = None
    deterministic: bool = False
    accumulate_grad_batches: int = 1  # an optimiser step every N batches; the lr follows the effective batch


@dataclass
class RunConfig:
    dir: str = "runs/${model.arch}"  # config.yaml, checkpoints/, summary.json land here
    resume: bool = True  # fit again on the same run.dir continues from checkpoints/last.ckpt
    # Resume although the world size, global batch, trainer.accumulate_grad_batches or
    # trainer.max_epochs differ from the checkpoint's (a warning says what is re-derived); false:
    # such a resume is an error.
    allow_resume_change: bool = False
    keep_hpc_checkpoints: Optional[int] = 2  # newest preemption checkpoints (hpc_ckpt_N) kept; None: all
    # Debugging: append every trained batch's labels, per rank, to PATH.rank<R>.jsonl (see docs/training.md).
    record_samples: Optional[str] = None
    # Failing fast (docs/clusters.md#when-things-fail): the process groups' timeout until the first
    # training step has run (start-up: data staging, compilation) and after it (a lost peer ends a
    # collective that soon); the step-progress watchdog (None: off); requeues after failures (SLURM).
    pg_timeout_init_s: float = 600
    pg_timeout_s: float = 120
    hang_timeout_s: Optional[float] = None
    max_restarts: int = 3
    # The health check before the first step (trainer/cluster/health.py): all-reduce, GPU, first
    # image; a failure exits 11 and the job is requeued without the host. The GPU all-reduce bus
    # bandwidth (GB/s) below which a multi-rank run fails it (None: not measured).
    health_check: bool = True
    min_allreduce_gbps: Optional[float] = None


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
class AugConfig:
    # Training augmentation. auto_augment and random_erasing run where the backend decodes (DALI's
    # auto_aug on dali_gpu/dali_cpu, torchvision.transforms.v2 on torchvision); MixUp/CutMix on the
    # batch on the training device, for every backend (trainer/recipe/mixing.py).
    auto_augment: str = "none"  # one of AUTO_AUGMENTS: none | trivial_wide | rand_augment (2 ops, magnitude 9)
    random_erasing: float = 0.0  # probability per image (torchvision's RandomErasing); 0: off
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weight; 0: off
    cutmix_alpha: float = 0.0  # 0: off; with mixup_alpha too, one of the two per batch, at random
    repeated_augment: int = 1  # each chosen image fed N times per epoch (DeiT's RASampler); 1: off
    # The training crop, one of CROPS: rrc (random-resized crop, area 0.08-1, aspect 3/4-4/3: the
    # ImageNet recipes') | pad_crop (He et al. 2015's CIFAR-10 crop: the image resized to
    # data.image_size square, crop_padding black px added on each side, a random data.image_size
    # crop). Either is followed by a random horizontal flip.
    crop: str = "rrc"
    crop_padding: int = 4  # pad_crop: px added on each side (the paper's 4 at 32 px); 0: no shift


@dataclass
class EvalConfig:
    tta_flip: bool = False  # validation averages the logits of each image and its mirror (as FFCV)


@dataclass
class EmaConfig:
    # An exponential moving average of the weights and BatchNorm statistics (trainer/recipe/ema.py),
    # kept in float32 and validated every epoch as val_ema/*; None: off. E.g. 0.9999 (per optimiser step).
    decay: Optional[float] = None
    every_n_steps: int = 1  # update after every N-th optimiser step (the decay applies per update)


@dataclass
class GuardConfig:
    # Non-finite steps and loss spikes (trainer/guard.py, docs/training.md "Non-finite losses").
    # true: a step whose all-reduced gradients are not finite is skipped on every rank (weights,
    # optimiser state and BatchNorm statistics stay as before it), decided on the device.
    enabled: bool = True
    # Consecutive skipped steps that roll the run back to its newest checkpoint: a few stray NaNs are
    # skipped; a run that keeps producing them has diverged. 16-mixed's loss scaler skips its first
    # overflowing steps too (a handful), well under this.
    max_skips: int = 20
    # A step's loss more than this many standard deviations above the mean of the previous
    # guard.window steps' losses is a spike and rolls the run back; None: off (the loss of a healthy
    # run is noisy: set it from its curve, e.g. 6).
    spike_zscore: Optional[float] = None
    window: int = 100  # steps of loss history the spike z-score is taken over (at least 10)
    # Rollbacks (newest checkpoint, the batches since it skipped) before the run stops as diverged (exit 13).
    max_rollbacks: int = 3
    # The host reads the skip count and losses back every N optimiser steps (one small read, then
    # the decision all-reduced); the training step itself makes no host sync.
    check_every_n_steps: int = 50


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
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


def load_config(overrides: list[str] | tuple[str, ...] = (), *, job_env: bool = False) -> DictConfig:
    """Compose the config from conf/ and ``key=value`` overrides, then validate it.

    ``job_env``: the config is for a job that runs elsewhere (``submit`` on a login node): a
    ``${oc.env:VAR}`` that this host cannot resolve is left to the job's environment and its key
    checked with the schema's default instead; every other key and type is still checked here.
    """
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
    validate(_with_job_env_deferred(cfg) if job_env else cfg)
    return cfg


def _with_job_env_deferred(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` to validate on a host that is not the job's: each value that reads an
    environment variable (``${oc.env:...}``) and does not resolve here takes the schema's default."""
    defaults = schema()
    checked = cfg.copy()
    for key, raw in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if not (isinstance(raw, str) and "${oc.env:" in raw):
            continue
        try:
            OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except OmegaConfBaseException:
            OmegaConf.update(checked, key, OmegaConf.select(defaults, key), force_add=False)
    return checked


def _leaves(node: Any, prefix: str = ""):
    """(dotted key, raw value) of every leaf of a plain container (lists are leaves)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]


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
    from trainer.recipe.losses import LOSSES
    from trainer.recipe.models import ARCHS  # light import: torch is already needed by every verb
    from trainer.recipe.optim import OPTIMIZERS
    from trainer.recipe.schedules import SCHEDULES

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, cfg)) from None

    def choice(key: str, allowed: Collection[str]) -> None:  # a tuple, or a name -> builder table
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
    choice("optim.name", OPTIMIZERS)
    choice("optim.schedule", SCHEDULES)
    choice("loss.name", LOSSES)
    if cfg.logger.wandb.log_model not in (True, False, "all"):
        raise ConfigError(f"logger.wandb.log_model={cfg.logger.wandb.log_model!r} must be true, false or all")
    for key in ("data.batch_size", "data.image_size", "data.val_resize", "optim.lr", "trainer.max_epochs",
                "trainer.num_nodes", "model.num_classes", "trainer.log_every_n_steps", "run.keep_hpc_checkpoints",
                "optim.eps", "optim.trust_coeff", "optim.poly_power", "trainer.accumulate_grad_batches"):
        positive(key)
    for key in ("trainer.limit_train_batches", "trainer.limit_val_batches"):
        _batch_limit(key, OmegaConf.select(cfg, key))
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be 0 or more")
    _validate_sizes_and_aug(cfg)
    if not 0 <= cfg.optim.label_smoothing < 1:
        raise ConfigError(f"optim.label_smoothing={cfg.optim.label_smoothing} must be in [0, 1)")
    if cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} must be 0 or more")
    _validate_optim(cfg.optim)
    _validate_ema_and_finetune(cfg)
    _validate_failure_handling(cfg.run)
    _validate_guard(cfg.guard)
    devices = cfg.trainer.devices
    if not (devices == "auto" or (isinstance(devices, int) and devices > 0)):
        raise ConfigError(f"trainer.devices={devices!r} must be a positive int or 'auto'")


def _validate_guard(guard: DictConfig) -> None:
    """guard.*: counts of at least 1 (max_rollbacks: 0 or more), a positive spike z-score or None."""
    for key in ("max_skips", "check_every_n_steps"):
        if guard[key] < 1:
            raise ConfigError(f"guard.{key}={guard[key]} must be at least 1")
    if guard.window < 10:
        raise ConfigError(f"guard.window={guard.window} must be at least 10 steps (a z-score needs a history)")
    if guard.max_rollbacks < 0:
        raise ConfigError(f"guard.max_rollbacks={guard.max_rollbacks} must be 0 or more (0: stop at the first)")
    if guard.spike_zscore is not None and guard.spike_zscore <= 0:
        raise ConfigError(f"guard.spike_zscore={guard.spike_zscore} must be positive (e.g. 6), or null (off)")


def _validate_failure_handling(run: DictConfig) -> None:
    """The timeouts of trainer/cluster/failfast.py. No order between hang_timeout_s and the pg
    timeouts is required: the watchdog ends every rank that makes no progress, whether stuck in its
    own code or in a collective waiting for a stuck peer, so every rank exits within hang_timeout_s
    (plus the dump) whichever is shorter; the pg timeout is the bound when the watchdog is off."""
    for key in ("pg_timeout_init_s", "pg_timeout_s", "hang_timeout_s"):
        value = run[key]
        if value is not None and value <= 0:
            raise ConfigError(f"run.{key}={value} must be positive (seconds)")
    if run.pg_timeout_s > run.pg_timeout_init_s:
        raise ConfigError(f"run.pg_timeout_s={run.pg_timeout_s} is longer than run.pg_timeout_init_s="
                          f"{run.pg_timeout_init_s}: the start-up timeout is the long one")
    if run.max_restarts < 0:
        raise ConfigError(f"run.max_restarts={run.max_restarts} must be 0 or more")
    if run.min_allreduce_gbps is not None and run.min_allreduce_gbps <= 0:
        raise ConfigError(f"run.min_allreduce_gbps={run.min_allreduce_gbps} must be positive (GB/s), or null (off)")


def _batch_limit(key: str, value: Any) -> None:
    """A batch limit as Lightning reads it: None, a count (int >= 0) or a fraction (float in [0, 1])."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    if isinstance(value, float) and 0 <= value <= 1:
        return
    raise ConfigError(f"{key}={value!r} must be a count of batches (an int, e.g. 10) or a fraction of them "
                      f"(a float in [0, 1], e.g. 0.25; 1.0 = all), or null (all)")


def _validate_sizes_and_aug(cfg: DictConfig) -> None:
    """The validation crop, progressive resizing, augmentation and test-time augmentation."""
    from data_pipelines.augment import AUTO_AUGMENTS, CROPS

    d, a = cfg.data, cfg.aug
    if d.val_image_size is None:
        crop_key, crop = "data.image_size", d.image_size
    else:
        crop_key, crop = "data.val_image_size", d.val_image_size
    if crop <= 0:
        raise ConfigError(f"{crop_key}={crop} must be positive")
    if d.val_resize < crop:
        raise ConfigError(
            f"data.val_resize={d.val_resize} is smaller than {crop_key}={crop}; "
            f"the centre crop must fit inside the resized image"
        )
    ramp = {k: d.progressive[k] for k in ("start_size", "end_size", "start_epoch", "end_epoch")}
    if any(v is not None for v in ramp.values()):
        unset = [f"data.progressive.{k}" for k, v in ramp.items() if v is None]
        if unset:
            raise ConfigError(f"progressive resizing needs all four keys: set {', '.join(unset)} (or none)")
        for key in ("start_size", "end_size"):
            if ramp[key] <= 0:
                raise ConfigError(f"data.progressive.{key}={ramp[key]} must be positive")
        if ramp["start_size"] > ramp["end_size"]:
            raise ConfigError(f"data.progressive.start_size={ramp['start_size']} is larger than "
                              f"data.progressive.end_size={ramp['end_size']}; the ramp grows (as FFCV's)")
        if not 0 <= ramp["start_epoch"] <= ramp["end_epoch"]:
            raise ConfigError(f"data.progressive.start_epoch={ramp['start_epoch']} and end_epoch={ramp['end_epoch']} "
                              f"must satisfy 0 <= start_epoch <= end_epoch")
    if d.progressive.step < 1:
        raise ConfigError(f"data.progressive.step={d.progressive.step} must be at least 1 px")
    if a.auto_augment not in AUTO_AUGMENTS:
        raise ConfigError(f"aug.auto_augment={a.auto_augment!r} is not allowed; choose one of: {', '.join(AUTO_AUGMENTS)}")
    if not 0 <= a.random_erasing <= 1:
        raise ConfigError(f"aug.random_erasing={a.random_erasing} must be a probability in [0, 1] (0: off)")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if a[key] < 0:
            raise ConfigError(f"aug.{key}={a[key]} must be 0 (off) or positive")
    if a.repeated_augment < 1:
        raise ConfigError(f"aug.repeated_augment={a.repeated_augment} must be 1 (off) or more")
    if a.crop not in CROPS:
        raise ConfigError(f"aug.crop={a.crop!r} is not allowed; choose one of: {', '.join(CROPS)} "
                          f"(rrc: random-resized crop; pad_crop: He et al.'s CIFAR pad-and-crop)")
    if a.crop_padding < 0:
        raise ConfigError(f"aug.crop_padding={a.crop_padding} must be 0 or more (px added on each side by pad_crop)")
    if a.crop == "pad_crop":
        smallest = min(d.image_size, d.progressive.start_size or d.image_size)
        if a.crop_padding >= smallest:
            raise ConfigError(f"aug.crop_padding={a.crop_padding} must be smaller than the training crop "
                              f"({smallest} px): a shift by the padding would leave a crop of padding only")


def _validate_optim(o: DictConfig) -> None:
    """The optimiser's and the schedule's ranges (timm's and torch's optimisers would refuse them
    only when built, after the data is listed)."""
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum={o.momentum} must be in [0, 1)")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be 0 or more")
    if o.nesterov and (o.name not in ("sgd", "lars") or o.momentum == 0):
        raise ConfigError(f"optim.nesterov=true needs optim.name=sgd or lars and optim.momentum > 0 "
                          f"(here optim.name={o.name}, optim.momentum={o.momentum})")
    betas = list(o.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if o.peak_epoch is not None:
        if o.schedule != "linear":
            raise ConfigError(f"optim.peak_epoch={o.peak_epoch} is for optim.schedule=linear (FFCV's ramp up and "
                              f"down), not {o.schedule!r}; leave it null")
        if o.peak_epoch < o.warmup_epochs:
            raise ConfigError(f"optim.peak_epoch={o.peak_epoch} is before the end of optim.warmup_epochs="
                              f"{o.warmup_epochs}; the ramp to the peak includes the warmup")
    milestones = list(o.milestones)
    if any(m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
        raise ConfigError(f"optim.milestones={milestones} must be positive epochs in ascending order, e.g. [30, 60, 80]")
    if not 0 < o.gamma <= 1:
        raise ConfigError(f"optim.gamma={o.gamma} must be in (0, 1]")


def _validate_ema_and_finetune(cfg: DictConfig) -> None:
    """The weights' moving average and fine-tuning. model.init_from's file is opened when the model
    is built (a checkpoint's saved config may name a file that is gone, and needs it no more)."""
    decay = cfg.ema.decay
    if decay is not None and not 0 < decay < 1:
        raise ConfigError(f"ema.decay={decay} must be between 0 and 1 (e.g. 0.9999), or null (off)")
    if cfg.ema.every_n_steps < 1:
        raise ConfigError(f"ema.every_n_steps={cfg.ema.every_n_steps} must be 1 or more")
    if cfg.model.freeze not in FREEZES:
        raise ConfigError(f"model.freeze={cfg.model.freeze!r} is not allowed; choose one of: {', '.join(FREEZES)}")
    if cfg.model.init_from == "":
        raise ConfigError("model.init_from='' is empty: give the path of a weights file, or null")


def require_init_from(cfg: DictConfig) -> str | None:
    """``model.init_from``; a ConfigError saying how to set it when it is unset under the fine-tuning
    recipe (checked when the model is built, as data.root is: every recipe composes without it)."""
    if cfg.model.init_from is None and cfg.experiment in ("finetune", "linear_probe"):
        raise ConfigError(
            f"model.init_from is not set: experiment={cfg.experiment} starts from trained weights; pass "
            "model.init_from=PATH (a torchvision state_dict, a .safetensors file or an imagenet-trainer .ckpt)"
        )
    return cfg.model.init_from


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


# --- the specs: the validated config as the plain frozen dataclasses the code takes ---------------


def _spec(cls: type, section: DictConfig, **keys: str):
    """``cls`` from ``section``'s keys of the same names as its fields (``keys``: field -> another
    key); lists become tuples (the specs are frozen)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = section[keys.get(f.name, f.name)]
        values[f.name] = tuple(value) if isinstance(value, ListConfig) else value
    return cls(**values)


def optim_spec(cfg: DictConfig) -> OptimSpec:
    return _spec(OptimSpec, cfg.optim)


def schedule_spec(cfg: DictConfig) -> ScheduleSpec:
    return _spec(ScheduleSpec, cfg.optim, name="schedule")


def loss_spec(cfg: DictConfig) -> LossSpec:
    return LossSpec(name=cfg.loss.name, label_smoothing=cfg.optim.label_smoothing)


def mix_spec(cfg: DictConfig) -> MixSpec:
    return _spec(MixSpec, cfg.aug)


def aug_spec(cfg: DictConfig) -> AugSpec:
    return _spec(AugSpec, cfg.aug)


def resolution_schedule(p: DictConfig) -> ResolutionSchedule | None:
    """``data.progressive`` as a schedule; None when its keys are unset (validate() has checked
    that all four are set or none)."""
    if p.start_size is None:
        return None
    return ResolutionSchedule(start_size=p.start_size, end_size=p.end_size, start_epoch=p.start_epoch,
                              end_epoch=p.end_epoch, step=p.step)


def data_spec(cfg: DictConfig) -> DataSpec:
    """The data section (``data.root`` required unless the backend is synthetic), with the run's
    seed, the model's class count (for synthetic data) and the progressive-resizing schedule."""
    d = cfg.data
    root = None if d.backend == "synthetic" else require_data_root(cfg)
    plain = {f.name for f in dataclasses.fields(DataSpec)} - {"root", "seed", "num_classes", "resolution"}
    return DataSpec(root=root, seed=cfg.seed, num_classes=cfg.model.num_classes,
                    resolution=resolution_schedule(d.progressive), **{k: d[k] for k in sorted(plain)})
