"""From a resolved config to Lightning objects, and the fit/validate jobs built on them.

With ``cli.py`` this is the entrypoint: the only code besides ``config.py`` that reads the config.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from data_pipelines.datamodule import ImageNetDataModule
from trainer.artifacts.export import checkpoint_weights
from trainer.artifacts.finetune import HEAD, freeze_backbone, load_weights, read_weights, reset_head
from trainer.callbacks import (AtomicCheckpointIO, BestAndLastCheckpoint, PlainProgress, ProgressBar,
                               RecordSamples, ReleaseValidationPipelines, RestartResumedEpoch, SampleGrid,
                               Throughput)
from trainer.cluster import preemption, slurm
from trainer.config import (ConfigError, apply_overrides, aug_spec, data_spec, from_saved, loss_spec, mix_spec,
                            optim_spec, require_init_from, schedule_spec, to_dict, to_yaml, validate)
from trainer.metrics_csv import RunCSVLogger, first_logged_step
from trainer.module import Classifier
from trainer.recipe.models import build_model

log = logging.getLogger("imagenet_trainer")


def wants_gpu(cfg: DictConfig) -> bool:
    accel = cfg.trainer.accelerator
    return accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())


def input_dtype(precision: str) -> str:
    """The image dtype the model consumes under ``trainer.precision``, for the data pipeline to emit
    (PipelineOptions' ``dtype``): half-precision runs need no float32 batch and no cast of it."""
    if precision.startswith("bf16"):
        return "bfloat16"
    if precision.startswith("16"):
        return "float16"
    return "float32"


def use_fast_gpu_math(deterministic: bool) -> None:
    """cuDNN picks the fastest conv algorithm for each shape (it times them once; shapes are fixed
    here), and float32 matmuls may use TF32 tensor cores, as cuDNN's convs already do by default.
    Both are off in deterministic runs."""
    if deterministic:
        return
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def build_datamodule(cfg: DictConfig) -> ImageNetDataModule:
    return ImageNetDataModule(data_spec(cfg), aug_spec(cfg), on_gpu=wants_gpu(cfg),
                              gpu_dtype=input_dtype(cfg.trainer.precision), channels_last=cfg.model.channels_last)


def build_module(cfg: DictConfig, classes: list[str], *, names: list[str] | None = None,
                 load_init_from: bool = True) -> Classifier:
    """The Classifier for ``cfg`` and ``classes`` (with ``names``, their words, saved beside them);
    its network starts from ``model.init_from``'s weights unless ``load_init_from`` is false (a
    resume, a validation: a checkpoint's weights follow)."""
    num_classes = cfg.model.num_classes or len(classes)
    if num_classes < len(classes):
        raise ConfigError(
            f"model.num_classes={num_classes} is smaller than the {len(classes)} classes found in the data; "
            f"leave it unset (null) to take the data's count"
        )
    m = cfg.model
    model = build_model(m.arch, num_classes, zero_init_residual=m.zero_init_residual, channels_last=m.channels_last,
                        blurpool=m.blurpool)
    init_from = require_init_from(cfg) if load_init_from else None
    if init_from:
        _init_weights(model, init_from)
        if m.reset_head:
            reset_head(model)
    if m.freeze == "backbone":
        frozen = freeze_backbone(model)
        _say(f"model.freeze=backbone: {frozen} parameter tensors frozen, only {HEAD} trains; its BatchNorm layers "
             f"stay in eval mode (Lightning's warning of modules in eval mode at the start of training is about them)")
    if m.compile:
        model = torch.compile(model)
    resolved = to_dict(cfg)
    resolved["model"]["num_classes"] = num_classes
    return Classifier(
        model, num_classes=num_classes, batch_size=cfg.data.batch_size, optim=optim_spec(cfg),
        schedule=schedule_spec(cfg), loss=loss_spec(cfg), mixing=mix_spec(cfg), channels_last=m.channels_last,
        tta_flip=cfg.eval.tta_flip, config=resolved, classes=list(classes),
        names=None if names is None else list(names),
    )


@rank_zero_only
def _say(message: str) -> None:
    log.info(message)


def _init_weights(model: torch.nn.Module, path: str) -> None:
    """``model.init_from``'s weights into ``model``; a ConfigError naming the key when they do not fit."""
    try:
        state_dict, kind = read_weights(path)
        note = load_weights(model, state_dict, source=f"model.init_from={path}")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"model.init_from={path}: {err}") from None
    _say(f"model.init_from: loaded {path} ({kind})" + (f"; {note}" if note else ""))


def build_trainer(cfg: DictConfig, run_dir: Path, *, for_fit: bool, resume_step: int | None = None) -> pl.Trainer:
    """The Trainer for ``cfg``, writing under ``run_dir``: with checkpoints, loggers and preemption
    handling when ``for_fit``, without them for a validation; DDP when there is more than one device.
    ``resume_step``: the first step a resumed fit logs (metrics.csv keeps the rows before it)."""
    t = cfg.trainer
    alloc = slurm.allocation()
    devices, num_nodes = _cluster_counts(cfg, alloc)
    distributed = num_nodes > 1 or (isinstance(devices, int) and devices > 1)
    on_gpu = wants_gpu(cfg)
    if on_gpu:
        use_fast_gpu_math(t.deterministic)
    plugins = _plugins(alloc)
    tty = sys.stdout.isatty()
    callbacks = _callbacks(cfg, run_dir, for_fit, alloc=alloc, on_gpu=on_gpu, tty=tty)
    loggers = _loggers(cfg, run_dir, for_fit, resume_step)
    return pl.Trainer(
        **_settings(t),
        devices=devices,
        num_nodes=num_nodes,
        strategy=_strategy(cfg) if distributed else "auto",
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=tty,
        enable_checkpointing=for_fit,
        default_root_dir=str(run_dir),
        plugins=plugins,
        # Lightning converts BatchNorm to SyncBatchNorm under DDP only (and back after the fit).
        sync_batchnorm=cfg.model.sync_bn,
        # Our loaders shard by global rank themselves (data_pipelines/sharding.py).
        use_distributed_sampler=False,
        # Two validation batches before training (Lightning's sanity check): a broken validation
        # pipeline fails in seconds, not after the first ImageNet epoch.
        num_sanity_val_steps=2,
    )


def _strategy(cfg: DictConfig):
    """DDP (as ``strategy="ddp"``) with the process groups' start-up timeout, run.pg_timeout_init_s;
    trainer/cluster/failfast.py shortens it to run.pg_timeout_s after the first step."""
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=cfg.run.pg_timeout_init_s))


def _cluster_counts(cfg: DictConfig, alloc: slurm.Allocation | None) -> tuple[object, int]:
    """(devices, num_nodes) from trainer.devices and trainer.num_nodes, checked against and filled
    in from the SLURM allocation ``alloc`` (None outside one); a mismatch is a ConfigError."""
    try:
        return slurm.resolve_devices(cfg.trainer.devices, cfg.trainer.num_nodes, alloc)
    except slurm.SlurmConfigError as err:
        raise ConfigError(str(err)) from None


def _plugins(alloc: slurm.Allocation | None) -> list:
    """Atomic checkpoint writes; inside a SLURM allocation also SLURM's cluster environment, with
    Lightning's own requeue off."""
    plugins: list = [AtomicCheckpointIO()]
    if alloc is not None:
        # Lightning's own USR1 handler checkpoints inside the signal handler and can deadlock
        # DDP; RequeueOnSignal checkpoints at a step every rank agrees on (trainer/cluster/preemption.py).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def _signal_handling(cfg: DictConfig, run_dir: Path, alloc: slurm.Allocation | None) -> pl.Callback:
    """Records SIGUSR1 from now on, and returns the callback that checkpoints on it at a step every
    rank agrees on, requeueing the job when inside a SLURM allocation."""
    from data_pipelines.launch import requeue_command

    preemption.listen()  # from now: SIGUSR1's default action would end the process
    requeue = requeue_command() if alloc is not None else None
    return preemption.RequeueOnSignal(run_dir, requeue=requeue, keep=cfg.run.keep_hpc_checkpoints)


def _callbacks(cfg: DictConfig, run_dir: Path, for_fit: bool, *, alloc: slurm.Allocation | None,
               on_gpu: bool, tty: bool) -> list[pl.Callback]:
    """The callbacks in the order Lightning calls them: for a fit, preemption handling, checkpoints,
    throughput, the grid of sample images and recorded samples; always, the release of validation
    pipelines and the progress."""
    t = cfg.trainer
    callbacks: list[pl.Callback] = []
    if for_fit:
        from trainer.cluster.failfast import FailFast

        # First: its watchdog counts as progress what the others do at each step, and it records a
        # failure before any other callback reacts to it (trainer/cluster/failfast.py).
        callbacks.append(FailFast(run_dir, pg_timeout_init_s=cfg.run.pg_timeout_init_s,
                                  pg_timeout_s=cfg.run.pg_timeout_s, hang_timeout_s=cfg.run.hang_timeout_s))
        if cfg.run.health_check:
            from trainer.cluster.health import HealthCheck

            # At the fit's start, before the sanity check: a bad host exits 11 (trainer/cluster/health.py).
            callbacks.append(HealthCheck(min_allreduce_gbps=cfg.run.min_allreduce_gbps))
        callbacks.append(_signal_handling(cfg, run_dir, alloc))
        if cfg.guard.enabled:
            from trainer.cluster.guard import NonFiniteGuard

            g = cfg.guard
            # Before the EMA: a skipped step is restored before any other callback sees the weights.
            callbacks.append(NonFiniteGuard(max_skips=g.max_skips, spike_zscore=g.spike_zscore, window=g.window,
                                            check_every_n_steps=g.check_every_n_steps))
        if cfg.ema.decay is not None:
            from trainer.recipe.ema import EMA  # imports timm when the fit starts

            # Validated as val_ema/* beside val/*; kept in every checkpoint (trainer/recipe/ema.py).
            callbacks.append(EMA(cfg.ema.decay, cfg.ema.every_n_steps))
        callbacks += [
            # best-epochNNN.ckpt (best val top-1) and last.ckpt (the newest state, every epoch).
            BestAndLastCheckpoint(
                run_dir / "checkpoints",
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
                monitor="val/top1",
                mode="max",
                save_top_k=1,
            ),
            Throughput(every=t.log_every_n_steps),
            # RUN_DIR/samples.png (and W&B "samples"): the first training images as augmented.
            SampleGrid(run_dir / "samples.png"),
        ]
        if cfg.run.record_samples:
            callbacks.append(RecordSamples(cfg.run.record_samples))
    callbacks.append(ReleaseValidationPipelines())
    # Each redraw of the bar reads the loss back to the host (a GPU sync): not every step there.
    bar_every = min(10, t.log_every_n_steps) if on_gpu else 1
    callbacks.append(ProgressBar(refresh_rate=bar_every) if tty else PlainProgress(every=t.log_every_n_steps))
    return callbacks


def _loggers(cfg: DictConfig, run_dir: Path, for_fit: bool, resume_step: int | None) -> list:
    """For a fit, metrics.csv in ``run_dir`` (kept across resumes) and then W&B when enabled; none
    otherwise."""
    if not for_fit:
        return []
    loggers = [RunCSVLogger(run_dir, resume_step=resume_step)]
    wandb_logger = _wandb_logger(cfg, run_dir)
    if wandb_logger is not None:
        loggers.append(wandb_logger)  # after the CSVLogger: trainer.log_dir stays run_dir
    return loggers


def _settings(t: DictConfig) -> dict:
    """The Trainer arguments taken as they are from the config's ``trainer`` section."""
    return dict(
        accelerator=t.accelerator,
        precision=t.precision,
        max_epochs=t.max_epochs,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        accumulate_grad_batches=t.accumulate_grad_batches,
    )


def _wandb_logger(cfg: DictConfig, run_dir: Path):
    """W&B beside the CSVLogger (trainer/tracking.py); None when disabled or not installed."""
    from trainer.tracking import build_wandb_logger

    w = cfg.logger.wandb
    return build_wandb_logger(
        run_dir=run_dir,
        project=w.project,
        entity=w.entity,
        name=w.name,
        group=w.group,
        tags=list(w.tags),
        mode=w.mode,
        log_model=w.log_model,
        config=to_dict(cfg),
    )


@rank_zero_only
def _write_text(path: Path, text: str) -> None:
    from data_pipelines.files import write_atomic

    write_atomic(path, text, fsync=False)


def _metrics(trainer: pl.Trainer) -> dict:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_ema/"))}


def resume_checkpoint(run_dir: Path, *, at_most_step: int | None = None) -> Path | None:
    """The checkpoint a fit in ``run_dir`` resumes from: of ``checkpoints/last.ckpt`` (end of each
    epoch), the ``hpc_ckpt_N.ckpt`` (written on SLURM's USR1 by trainer/cluster/preemption.py,
    mid-epoch) and ``checkpoints/best-*.ckpt``, the newest by global step (then by time) that loads.

    Each is written atomically, but a file can still be damaged (a full disk, a copy cut short): one
    that does not load is renamed ``*.damaged`` with a warning and the next newest is taken, never a
    start from scratch while a loadable checkpoint is left. ``at_most_step``: only checkpoints of
    that global step or earlier (a rollback, trainer/cluster/guard.py)."""
    ckpt_dir = run_dir / "checkpoints"
    candidates = [ckpt_dir / "last.ckpt"]
    candidates += [path for _, path in preemption.hpc_checkpoints(run_dir)]
    candidates += sorted(ckpt_dir.glob("best-*.ckpt"))
    ranked = []
    for path in candidates:
        if not path.is_file():
            continue
        step = preemption.checkpoint_step(path)
        if step is None:
            _set_aside(path)
            continue
        if at_most_step is None or step <= at_most_step:
            try:
                ranked.append(((step, path.stat().st_mtime), path))
            except OSError:  # set aside by another rank meanwhile
                continue
    return max(ranked, key=lambda r: r[0])[1] if ranked else None


def _set_aside(path: Path) -> None:
    """Rename a damaged checkpoint to ``*.damaged`` (kept for a look, never resumed from)."""
    target = path.with_name(path.name + ".damaged")
    try:
        path.replace(target)
    except OSError:  # another rank set it aside first
        return
    log.warning("%s does not load as a checkpoint (truncated or corrupt): set aside as %s; resuming from the "
                "newest loadable one instead", path, target.name)


def resume_changes(ckpt: dict, *, world_size: int, batch_size: int, max_epochs: int,
                   accumulate: int = 1) -> list[tuple[str, int, int]]:
    """What differs between checkpoint ``ckpt`` and this run among the settings its peak lr, lr
    schedule and data position were derived from: (setting, the checkpoint's value, this run's).

    A checkpoint written before the world size was saved in it has an unknown world size: its
    per-device batch (data.batch_size) is compared instead of the global batch. One written before
    trainer.accumulate_grad_batches existed accumulated nothing (1).
    """
    saved = ckpt.get("hyper_parameters", {}).get("config") or {}
    old_batch = saved.get("data", {}).get("batch_size")
    old_epochs = saved.get("trainer", {}).get("max_epochs")
    old_accumulate = saved.get("trainer", {}).get("accumulate_grad_batches", 1)
    old_world = ckpt.get("world_size")
    changes = []
    if old_world is not None and old_world != world_size:
        changes.append(("the world size (trainer.num_nodes x trainer.devices)", old_world, world_size))
    if old_batch is not None and old_world is None and old_batch != batch_size:
        changes.append(("data.batch_size", old_batch, batch_size))
    if old_batch is not None and old_world is not None and old_batch * old_world != batch_size * world_size:
        changes.append(("the global batch (data.batch_size x world size)", old_batch * old_world,
                        batch_size * world_size))
    if old_accumulate != accumulate:
        changes.append(("trainer.accumulate_grad_batches", old_accumulate, accumulate))
    if old_epochs is not None and old_epochs != max_epochs:
        changes.append(("trainer.max_epochs", old_epochs, max_epochs))
    return changes


def _read_resume_state(ckpt_path: Path) -> dict:
    """The checkpoint a fit resumes from; mmap: its config and counters are read, not its weights."""
    return torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)


def _check_resume(ckpt_path: Path, ckpt: dict, cfg: DictConfig, trainer: pl.Trainer, dm: ImageNetDataModule,
                  module: Classifier) -> None:
    """Refuse (ConfigError) to resume from ``ckpt_path`` (read as ``ckpt``) with another world size,
    global batch or trainer.max_epochs, unless run.allow_resume_change; then warn what follows from
    the change, and restart the checkpoint's epoch when its count of trained batches is of another
    batch size."""
    changes = resume_changes(ckpt, world_size=trainer.world_size, batch_size=cfg.data.batch_size,
                             max_epochs=cfg.trainer.max_epochs, accumulate=cfg.trainer.accumulate_grad_batches)
    if not changes:
        return
    listed = ", ".join(f"{what} {old} (this run: {new})" for what, old, new in changes)
    if not cfg.run.allow_resume_change:
        raise ConfigError(
            f"{ckpt_path} was written with {listed}; resuming with another value changes the lr schedule "
            f"and the data position. Resume with the checkpoint's values, or set run.allow_resume_change=true "
            f"to continue with the new ones (the schedule's length and the data position are re-derived, "
            f"the peak lr is kept)"
        )
    # The data position counts batches per rank: accumulating another number of them changes the
    # effective batch (and so the peak lr it gave), not the position.
    lr_changed = any(what != "trainer.max_epochs" for what, _, _ in changes)
    batch_changed = any(what not in ("trainer.max_epochs", "trainer.accumulate_grad_batches") for what, _, _ in changes)
    if batch_changed:
        dm.restart_epoch()
        module.restart_epoch()
        trainer.callbacks.append(RestartResumedEpoch())
    if not trainer.is_global_zero:
        return
    # What Lightning restores (verified in tests/test_checkpoints.py): the scheduler's base lr (the
    # peak) and the step count; the lambda, and with it the schedule's length, is this run's, and
    # Classifier re-reads the step count in epochs when the steps per epoch changed.
    where = "the start of the checkpoint's epoch" if batch_changed else "the checkpoint's point of the run"
    said = [f"resuming from {ckpt_path} with {listed} (run.allow_resume_change=true).",
            f"The lr schedule's length is re-derived from this run's trainer.max_epochs and steps per epoch, "
            f"and it continues at {where} counted in epochs (the checkpoint's step {ckpt.get('global_step')} "
            f"was of its own steps per epoch)."]
    if lr_changed:
        base_lrs = [sched.get("base_lrs") for sched in ckpt.get("lr_schedulers", [])]
        peak = f" ({base_lrs[0][0]:.4g})" if base_lrs and base_lrs[0] else ""
        said += [f"The peak lr stays the checkpoint's{peak}: optim.lr x effective batch / 256 is not re-applied."]
    if batch_changed:
        position = ckpt.get(ImageNetDataModule.__qualname__) or {}
        said += [f"The saved data position (epoch={position.get('epoch')}, "
                 f"batches_done={position.get('batches_done')}) counts the checkpoint's batches per rank: "
                 f"that epoch restarts from its first batch."]
    log.warning(" ".join(said))


def fit(cfg: DictConfig) -> dict | None:
    """Train as configured; writes ``run.dir/summary.json`` and returns the summary on rank 0
    (None on the other ranks). A rollback of the non-finite guard (trainer/cluster/guard.py)
    fits again from the checkpoint before the trouble, at most guard.max_rollbacks times; then
    :class:`~trainer.cluster.guard.Diverged` (exit code 13)."""
    from trainer.cluster.guard import Diverged, Rollback, RollbackState

    state = RollbackState()
    while True:
        try:
            return _fit_once(cfg, state)
        except Rollback as rollback:
            back_to = resume_checkpoint(Path(cfg.run.dir), at_most_step=rollback.bad_from_step)
            if back_to is None:
                raise Diverged(f"{rollback}, but no checkpoint was written before step {rollback.bad_from_step}") from None
            state.record(rollback, preemption.checkpoint_step(back_to) or 0, cfg.guard.max_rollbacks)
            log.warning("guard: rollback %d: resuming from %s, the data advanced to epoch %d after %d batches",
                        state.rollbacks, back_to, *rollback.position)


def _fit_once(cfg: DictConfig, guard_state) -> dict | None:
    t0 = time.time()
    run_dir = Path(cfg.run.dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume_from = resume_checkpoint(run_dir, at_most_step=guard_state.bad_from_step)
    if resume_from is not None and not cfg.run.resume:
        raise ConfigError(
            f"{resume_from} exists and run.resume=false: choose another run.dir, or resume with run.resume=true"
        )
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    # A resume takes the checkpoint's weights: model.init_from is for the fit's start only.
    # A resume takes the data's names too: they label outputs, so (unlike classes) they may change.
    module = build_module(cfg, dm.classes, names=dm.names, load_init_from=resume_from is None)
    resumed = _read_resume_state(resume_from) if resume_from is not None else None
    trainer = build_trainer(cfg, run_dir, for_fit=True,
                            resume_step=first_logged_step(resumed) if resumed is not None else None)
    if resume_from is not None:
        # Before config.yaml is written: a refused resume leaves the run directory as it was.
        _check_resume(resume_from, resumed, cfg, trainer, dm, module)
    for callback in trainer.callbacks:
        if hasattr(callback, "rollback_state"):  # the non-finite guard: carries the rollbacks so far
            callback.rollback_state(guard_state)
    _write_text(run_dir / "config.yaml", to_yaml(cfg))
    ckpt_path = str(resume_from) if resume_from else None
    if ckpt_path:
        log.info("resuming from %s (set run.resume=false or another run.dir to start afresh)", ckpt_path)
    with warnings.catch_warnings():
        # Our DataModule restores the data position itself (ImageNetDataModule.state_dict), which
        # Lightning's check for a stateful DataLoader does not see.
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    metrics = _metrics(trainer)
    ckpt_cb = trainer.checkpoint_callback
    best = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if "val/top1" not in metrics:  # nothing left to train (a finished run fitted again)
        trainer.validate(module, datamodule=dm, verbose=False)
        metrics = _metrics(trainer)
    summary = {
        **metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_ckpt": best,
        "best/val/top1": float(ckpt_cb.best_model_score) if ckpt_cb is not None and ckpt_cb.best_model_score is not None else None,
        "last_ckpt": str(last),
        "backend": dm.backend,
        "world_size": trainer.world_size,
        "wall_time_s": round(time.time() - t0, 2),
    }
    _write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary if trainer.is_global_zero else None


def load_checkpoint_config(ckpt_path: str | Path, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The config saved in a checkpoint, with ``overrides`` applied; and the raw checkpoint."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    # weights_only: a checkpoint from elsewhere must not run code when loaded.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    if "config" not in hp:
        raise ConfigError(f"{path} is not an imagenet-trainer checkpoint (no config in its hyper_parameters)")
    cfg = apply_overrides(from_saved(hp["config"], str(path)), overrides)
    validate(cfg)
    return cfg, ckpt


def validate_checkpoint(ckpt_path: str | Path, overrides: list[str], weights: str | None = None) -> dict | None:
    """Validate a checkpoint on ``data.root``'s val split (the saved one unless overridden); the
    result (over every rank's images) on global rank 0, None on the other ranks. ``weights``:
    ``"ema"``, ``"raw"`` or None (the EMA when the checkpoint holds one)."""
    cfg, ckpt = load_checkpoint_config(ckpt_path, overrides)
    dm = build_datamodule(cfg)
    hp = ckpt["hyper_parameters"]
    classes = hp.get("classes") or dm.classes
    if dm.backend != "synthetic" and list(dm.classes) != list(classes):
        raise ConfigError(
            f"the classes under data.root={cfg.data.root} differ from the {len(classes)} the checkpoint "
            f"was trained on: the class index would not match"
        )
    state_dict, weights = checkpoint_weights(ckpt, weights, str(ckpt_path))  # a ValueError says what is wrong
    # Names are for people: the checkpoint's when it has them (older ones do not), else the data's;
    # names that differ from the data's are no error, as long as the classes match.
    names = hp["names"] if hp.get("names") is not None else dm.names
    module = build_module(cfg, classes, names=names, load_init_from=False)
    module.load_state_dict(ckpt["state_dict"])  # the raw weights, and the metrics' and loss' state
    getattr(module.model, "_orig_mod", module.model).load_state_dict(state_dict)  # the chosen ones
    trainer = build_trainer(cfg, Path(cfg.run.dir), for_fit=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    result = _metrics(trainer)
    result = {
        "checkpoint": str(ckpt_path),
        "top1": result.get("val/top1"),
        "top5": result.get("val/top5"),
        "images": int(result.get("val/images", 0)),
        "loss": result.get("val/loss"),
        "weights": weights,
        "data_root": None if dm.backend == "synthetic" else cfg.data.root,  # synthetic: no tree (data.root unset)
    }
    return result if trainer.is_global_zero else None
