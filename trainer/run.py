"""From a resolved config to Lightning objects, and the fit/validate jobs built on them.

With ``cli.py`` this is the entrypoint: the only code besides ``config.py`` that reads the config.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_only

from data_pipelines.datamodule import ImageNetDataModule
from trainer import preemption, slurm
from trainer.callbacks import AtomicCheckpointIO, PlainProgress, ProgressBar, RecordSamples, Throughput
from trainer.config import ConfigError, apply_overrides, from_saved, require_data_root, to_dict, to_yaml, validate
from trainer.models import build_model
from trainer.module import Classifier

log = logging.getLogger("imagenet_trainer")


def wants_gpu(cfg: DictConfig) -> bool:
    accel = cfg.trainer.accelerator
    return accel in ("gpu", "cuda") or (accel == "auto" and torch.cuda.is_available())


def input_dtype(precision: str) -> str:
    """The image dtype the model consumes under ``trainer.precision``, for the data pipeline to emit
    (DALILoader's ``dtype``): half-precision runs need no float32 batch and no cast of it."""
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
    d = cfg.data
    root = None if d.backend == "synthetic" else require_data_root(cfg)
    return ImageNetDataModule(
        root=root,
        backend=d.backend,
        on_gpu=wants_gpu(cfg),
        batch_size=d.batch_size,
        image_size=d.image_size,
        val_resize=d.val_resize,
        num_workers=d.num_workers,
        seed=cfg.seed,
        filelist_cache=d.filelist_cache,
        synthetic_size=d.synthetic_size,
        num_classes=cfg.model.num_classes,
        gpu_dtype=input_dtype(cfg.trainer.precision),
        channels_last=cfg.model.channels_last,
    )


def build_module(cfg: DictConfig, classes: list[str]) -> Classifier:
    num_classes = cfg.model.num_classes or len(classes)
    if num_classes < len(classes):
        raise ConfigError(
            f"model.num_classes={num_classes} is smaller than the {len(classes)} classes found in the data; "
            f"leave it unset (null) to take the data's count"
        )
    m, o = cfg.model, cfg.optim
    model = build_model(m.arch, num_classes, zero_init_residual=m.zero_init_residual, channels_last=m.channels_last)
    if m.compile:
        model = torch.compile(model)
    resolved = to_dict(cfg)
    resolved["model"]["num_classes"] = num_classes
    return Classifier(
        model,
        num_classes=num_classes,
        batch_size=cfg.data.batch_size,
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        label_smoothing=o.label_smoothing,
        warmup_epochs=o.warmup_epochs,
        channels_last=m.channels_last,
        config=resolved,
        classes=list(classes),
    )


def build_trainer(cfg: DictConfig, run_dir: Path, *, for_fit: bool) -> pl.Trainer:
    t = cfg.trainer
    alloc = slurm.allocation()
    try:
        devices, num_nodes = slurm.resolve_devices(t.devices, t.num_nodes, alloc)
    except slurm.SlurmConfigError as err:
        raise ConfigError(str(err)) from None
    distributed = num_nodes > 1 or (isinstance(devices, int) and devices > 1)
    on_gpu = wants_gpu(cfg)
    if on_gpu:
        use_fast_gpu_math(t.deterministic)
    plugins: list = [AtomicCheckpointIO()]
    callbacks: list[pl.Callback] = []
    if alloc is not None:
        # Lightning's own USR1 handler checkpoints inside the signal handler and can deadlock
        # DDP; RequeueOnSignal checkpoints at a step every rank agrees on (trainer/preemption.py).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if for_fit:
        preemption.listen()  # from now: SIGUSR1's default action would end the process
        requeue = preemption.requeue_command() if alloc is not None else None
        callbacks.append(preemption.RequeueOnSignal(run_dir, requeue=requeue))
    tty = sys.stdout.isatty()
    loggers = []
    if for_fit:
        callbacks += [
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="best-epoch{epoch:03d}",
                auto_insert_metric_name=False,
                monitor="val/top1",
                mode="max",
                save_top_k=1,
                save_last=True,
            ),
            Throughput(every=t.log_every_n_steps),
        ]
        if cfg.run.record_samples:
            callbacks.append(RecordSamples(cfg.run.record_samples))
        loggers.append(CSVLogger(save_dir=str(run_dir), name="", version=""))
        wandb_logger = _wandb_logger(cfg, run_dir)
        if wandb_logger is not None:
            loggers.append(wandb_logger)  # after the CSVLogger: trainer.log_dir stays run_dir
    # Each redraw of the bar reads the loss back to the host (a GPU sync): not every step there.
    bar_every = min(10, t.log_every_n_steps) if on_gpu else 1
    callbacks.append(ProgressBar(refresh_rate=bar_every) if tty else PlainProgress(every=t.log_every_n_steps))
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if distributed else "auto",
        precision=t.precision,
        max_epochs=t.max_epochs,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        callbacks=callbacks,
        logger=loggers or False,
        enable_progress_bar=tty,
        enable_checkpointing=for_fit,
        default_root_dir=str(run_dir),
        plugins=plugins,
        # Our loaders shard by global rank themselves (data_pipelines/sharding.py).
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _metrics(trainer: pl.Trainer) -> dict:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a fit in ``run_dir`` resumes from: the newer of ``checkpoints/last.ckpt``
    (end of each epoch) and the newest ``hpc_ckpt_N.ckpt`` (written on SLURM's USR1 by
    trainer/preemption.py, mid-epoch). Both are written atomically, so neither can be a half-written file."""
    candidates = [run_dir / "checkpoints" / "last.ckpt"]
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    candidates += hpc[-1:]
    existing = [p for p in candidates if p.is_file()]
    return max(existing, key=lambda p: p.stat().st_mtime) if existing else None


def fit(cfg: DictConfig) -> dict | None:
    """Train as configured; writes ``run.dir/summary.json`` and returns the summary on rank 0
    (None on the other ranks)."""
    t0 = time.time()
    run_dir = Path(cfg.run.dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume_from = resume_checkpoint(run_dir)
    if resume_from is not None and not cfg.run.resume:
        raise ConfigError(
            f"{resume_from} exists and run.resume=false: choose another run.dir, or resume with run.resume=true"
        )
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.classes)
    trainer = build_trainer(cfg, run_dir, for_fit=True)
    _write_text(run_dir / "config.yaml", to_yaml(cfg))
    ckpt_path = str(resume_from) if resume_from else None
    if ckpt_path:
        log.info("resuming from %s (set run.resume=false or another run.dir to start afresh)", ckpt_path)
    with warnings.catch_warnings():
        # Our DataModule restores the data position itself (ImageNetDataModule.state_dict), which
        # Lightning's check for a stateful DataLoader does not see.
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        # Epoch means of train metrics are per rank on purpose: syncing them costs an all-reduce.
        warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
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


def validate_checkpoint(ckpt_path: str | Path, overrides: list[str]) -> dict:
    """Validate a checkpoint on ``data.root``'s val split (the saved one unless overridden)."""
    cfg, ckpt = load_checkpoint_config(ckpt_path, overrides)
    dm = build_datamodule(cfg)
    classes = ckpt["hyper_parameters"].get("classes") or dm.classes
    if dm.backend != "synthetic" and list(dm.classes) != list(classes):
        raise ConfigError(
            f"the classes under data.root={cfg.data.root} differ from the {len(classes)} the checkpoint "
            f"was trained on: the class index would not match"
        )
    module = build_module(cfg, classes)
    module.load_state_dict(ckpt["state_dict"])
    trainer = build_trainer(cfg, Path(cfg.run.dir), for_fit=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    result = _metrics(trainer)
    result = {
        "checkpoint": str(ckpt_path),
        "top1": result.get("val/top1"),
        "top5": result.get("val/top5"),
        "images": int(result.get("val/images", 0)),
        "loss": result.get("val/loss"),
        "data_root": cfg.data.root,
    }
    return result
