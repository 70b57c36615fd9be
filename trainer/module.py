"""The LightningModule: model, loss, optimiser, learning-rate schedule and metrics.

Data belongs to the DataModule and launching to the CLI; nothing here reads the config.
The network, losses, optimisers, schedules and mixing themselves are the recipe's parts
(trainer/recipe/: ``models.py``, ``losses.py``, ``optim.py``, ``schedules.py``, ``mixing.py``).
"""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from trainer.recipe import schedules
from trainer.recipe.losses import build_loss
from trainer.recipe.mixing import build_mixing
from trainer.recipe.optim import build_optimizer, optimizer_entry
from trainer.recipe.schedules import warmup_cosine  # noqa: F401 - importable from here, as before schedules.py
from trainer.recipe.specs import LossSpec, MixSpec, OptimSpec, ScheduleSpec, as_plain


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: none on BatchNorm parameters or biases.

    Every 1-D parameter of these networks is a BN scale/shift or a bias, so the rule is "ndim > 1".
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def sgd_implementation(params, *, clip_under_amp: bool = False) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is on a CUDA device, else ``{"foreach": True}``.

    Fused SGD updates all parameters in one kernel, and under a GradScaler (16-mixed) it reads the
    inf check on the device instead of with ``.item()``: no host sync per step. Elsewhere the
    multi-tensor (foreach) path is the fastest one torch has.

    ``clip_under_amp``: gradients are clipped under mixed precision (bf16-mixed or 16-mixed). Then
    foreach too: Lightning's MixedPrecision plugin refuses to clip for an optimizer that unscales
    inside its own step (``_step_supports_amp_scaling``, which fused SGD sets), failing the first step.
    """
    params = list(params)
    if params and all(p.device.type == "cuda" for p in params) and not clip_under_amp:
        return {"fused": True}
    return {"foreach": True}


def keep_implementation(optimizer: torch.optim.Optimizer, impl: dict[str, bool]) -> None:
    """Keep the implementation chosen for this run when a checkpoint's optimizer state is loaded.

    ``load_state_dict`` restores each group's saved ``fused``/``foreach`` flags, while the optimizer
    still announces, from its construction, whether it unscales inside its step. A run resumed
    from a checkpoint written with the other implementation (a CPU run, or clipping turned off on
    resume) would then fail its first 16-mixed step ("Expected grad_scale and found_inf to be None").
    """
    flags = {"fused": impl.get("fused"), "foreach": impl.get("foreach")}

    def restore(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group.update(flags)

    optimizer.register_load_state_dict_post_hook(restore)


def clips_under_amp(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` clips gradients under a mixed-precision (autocast) plugin."""
    return bool(trainer.gradient_clip_val) and isinstance(trainer.precision_plugin, MixedPrecision)


class Classifier(pl.LightningModule):
    """Image classification: a loss (``loss``: ce or bce), an optimiser (``optim``: sgd, lars, lamb or
    adamw) and a per-iteration lr schedule (``schedule``) after a linear warmup, each a spec
    (trainer/recipe/specs.py). The defaults are cross-entropy and warmup + cosine, as before these
    choices existed.

    ``config`` (the resolved run config, a plain dict), ``classes`` (class names in index
    order) and ``names`` (each class's words, "tench, Tinca tinca", aligned with ``classes``; None
    when the data names none) are saved in every checkpoint, so a checkpoint is enough to rebuild,
    validate, export and label the model's outputs; the specs are saved beside them as plain dicts.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        batch_size: int,
        optim: OptimSpec,
        schedule: ScheduleSpec = ScheduleSpec(),
        loss: LossSpec = LossSpec(),
        mixing: MixSpec = MixSpec(),
        channels_last: bool = False,
        tta_flip: bool = False,
        config: dict | None = None,
        classes: list[str] | None = None,
        names: list[str] | None = None,
    ) -> None:
        super().__init__()
        # Plain dicts, not the spec objects: checkpoints are read with torch.load(weights_only=True).
        self.save_hyperparameters(dict(
            num_classes=num_classes, batch_size=batch_size, channels_last=channels_last, tta_flip=tta_flip,
            config=config, classes=classes, names=names, optim=as_plain(optim), schedule=as_plain(schedule),
            loss=as_plain(loss), mixing=as_plain(mixing),
        ))
        self.model = model
        self.optim_spec, self.schedule_spec = optim, schedule
        # Takes class indices or soft [N, C] targets (mixed labels) alike.
        self.criterion = build_loss(loss.name, loss.label_smoothing)
        # MixUp/CutMix of each training batch on its device (None: off); no parameters or buffers.
        self.mixing = build_mixing(num_classes, mixing.mixup_alpha, mixing.cutmix_alpha)
        self.tta_flip = tta_flip
        self._add_metrics(num_classes)
        self._steps_per_epoch: float | None = None  # optimiser steps per epoch, set with the schedule
        self._resumed_steps_per_epoch: float | None = None  # the resumed checkpoint's
        self._restart_epoch = False

    def _add_metrics(self, num_classes: int) -> None:
        """The training and validation metrics (module attributes, so Lightning moves and syncs them)."""
        # validate_args=False: the label-range check runs torch.unique, a host sync on a GPU, every
        # training step; the validation metrics below keep it.
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        # The epoch's mean training loss over every rank's images (the metric syncs its sum and
        # count across ranks once, at the epoch's end); a value logged with on_epoch would be this
        # rank's mean only. No NaN check: it reads a value back (a GPU sync) every step.
        self.train_loss = MeanMetric(nan_strategy="disable")
        # Counts the images validated over all ranks: shows that none is counted twice.
        # nan_strategy="disable": the default NaN check reads a value back (a GPU sync) every step,
        # and a count cannot be NaN.
        self.val_images = SumMetric(nan_strategy="disable")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's logits in float32, whatever the autocast dtype: the loss and the metrics are
        computed in full precision (in bfloat16, close logits tie and top-1 is decided by rounding)."""
        return self(images).float()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.mixing is not None:  # labels become soft targets [N, C], which the loss takes as they are
            images, labels = self.mixing(images, labels)
        logits = self.logits(images)
        loss = self.criterion(logits, labels)
        # Soft targets (mixed labels): top-1 against the class with the largest share.
        self.train_top1(logits, labels.argmax(dim=1) if labels.ndim > 1 else labels)
        n = labels.shape[0]
        # A non-finite loss (a step the guard skips, trainer/cluster/guard.py) is left out of the
        # epoch's mean, on the device: a weight of 0.
        finite = loss.detach().isfinite()
        self.train_loss.update(torch.where(finite, loss.detach(), 0.0), finite * n)
        # No sync_dist on step values: each would be a blocking all-reduce every step. No prog_bar:
        # Lightning reads prog_bar step values back to the host (.item()) after every step, a GPU
        # sync; the terminal bar (callbacks.ProgressBar) reads the loss only when it redraws.
        # The step values are this rank's; the epoch values are over every rank (metric objects).
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log("train/top1", self.train_top1, on_step=True, on_epoch=True, batch_size=n)
        if self._trainer is not None:
            # A CPU tensor: Lightning would turn a python float into a tensor on the module's device,
            # a blocking host-to-device copy (a host sync) on every step.
            lr = torch.tensor(self.optimizers().param_groups[0]["lr"])
            self.log("lr", lr, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self.logits(images)
        if self.tta_flip:
            # FFCV's test-time augmentation: the mean of the logits of the image and its mirror
            # (logits, not probabilities; the loss and metrics below all take the mean).
            logits = (logits + self.logits(images.flip(-1))) / 2
        n = labels.shape[0]
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
        # Made on the device (a fill), not copied from the host: no blocking transfer per step.
        self.val_images.update(torch.full((), n, dtype=torch.float32, device=logits.device))
        # val/loss is the training criterion, label smoothing included (comparable with train/loss);
        # val/ce is the plain cross-entropy, comparable across recipes with different smoothing.
        # Both are means over every image of every rank (the sums and counts are reduced once).
        self.log("val/loss", self.criterion(logits, labels), on_epoch=True, sync_dist=True, batch_size=n)
        self.log("val/ce", nn.functional.cross_entropy(logits, labels), on_epoch=True, sync_dist=True, batch_size=n)
        # Metric objects sync their states across ranks at compute(): exact under DDP.
        self.log("val/top1", self.val_top1, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/top5", self.val_top5, on_epoch=True, batch_size=n)
        self.log("val/images", self.val_images, on_epoch=True, batch_size=n)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(images).softmax(dim=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # With the config's per-device batch, the global batch the peak lr and the schedule were
        # derived from: a resume compares them with its own (trainer/run.py).
        checkpoint["world_size"] = self.trainer.world_size
        # The unit of the scheduler's step count: a resume with another one re-reads it in epochs.
        checkpoint["steps_per_epoch"] = self._steps_per_epoch

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_steps_per_epoch = checkpoint.get("steps_per_epoch")  # absent before it was saved

    def restart_epoch(self) -> None:
        """The resumed run trains the checkpoint's epoch again from its first batch (the DataModule's
        ``restart_epoch``): the schedule resumes at that epoch's start too. Call before ``fit``."""
        self._restart_epoch = True

    def on_train_start(self) -> None:
        self._continue_schedule_in_epochs()

    def _continue_schedule_in_epochs(self) -> None:
        """After a resume whose steps per epoch differ from the checkpoint's (another global batch,
        world size or accumulation), move the restored schedule to the same point of the run in
        epochs. Lightning restores the scheduler's step count, which counts the checkpoint's
        steps: read in this run's, a larger batch would jump to the end of the cosine (lr 0) and a
        smaller one back up it."""
        old, new = self._resumed_steps_per_epoch, self._steps_per_epoch
        self._resumed_steps_per_epoch = None
        if old is None or new is None or math.isclose(old, new):
            return
        scheduler = self.lr_schedulers()
        epochs_done = scheduler.last_epoch / old
        if self._restart_epoch:  # the data restarts the epoch: so does the schedule
            epochs_done = math.floor(epochs_done + 1e-9)
        step = int(round(epochs_done * new))
        scheduler.last_epoch = step
        lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs

    # --- optimiser and schedule ----------------------------------------------------------

    def peak_lr(self) -> float:
        """``lr`` is given per 256 images; the run scales it by the effective batch of one optimiser
        step (Goyal et al.): batch_size x world size x the trainer's accumulate_grad_batches."""
        effective_batch = self.hparams.batch_size
        if self._trainer is not None:
            effective_batch *= self.trainer.world_size * self.trainer.accumulate_grad_batches
        return self.optim_spec.lr * effective_batch / 256

    def configure_optimizers(self):
        optimizer = self._build_optimizer()
        # Optimiser steps: Lightning divides the batches by accumulate_grad_batches.
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs)
        self._steps_per_epoch = steps_per_epoch
        sched = self.schedule_spec
        warmup_epochs = sched.warmup_epochs
        if sched.name == "linear" and sched.peak_epoch is not None:
            warmup_epochs = max(warmup_epochs, sched.peak_epoch)  # one ramp from zero up to the peak (FFCV's)
        warmup_steps = int(round(warmup_epochs * steps_per_epoch))
        multiplier = schedules.schedule(sched.name, warmup_steps=warmup_steps, total_steps=total_steps,
                                        milestones=[int(round(m * steps_per_epoch)) for m in sched.milestones],
                                        gamma=sched.gamma, power=sched.poly_power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """``optim_spec``'s optimiser at the peak lr; torch's ones fused or foreach (``sgd_implementation``).
        Lightning has moved the model to its device before it calls ``configure_optimizers``."""
        spec = self.optim_spec
        torch_impl = optimizer_entry(spec.name).torch_impl
        impl = {}
        if torch_impl:
            impl = sgd_implementation(self.model.parameters(), clip_under_amp=clips_under_amp(self.trainer))
        optimizer = build_optimizer(spec, param_groups(self.model, spec.weight_decay), lr=self.peak_lr(), impl=impl)
        if torch_impl:
            keep_implementation(optimizer, impl)
        return optimizer
