"""An exponential moving average (EMA) of the network's weights, validated beside the raw ones.

After every ``every_n_steps``-th optimiser step, ``ema = decay * ema + (1 - decay) * w`` for every
parameter and every floating-point buffer (BatchNorm's running statistics; the integer batch counter
is copied), starting from the weights the fit starts with. The average is kept in float32 whatever
``trainer.precision`` is: at decay 0.9999 an update is 1e-4 of the difference, below bfloat16's
resolution (8 bits of mantissa), so a bfloat16 average would stop moving.

Each validation logs ``val_ema/top1``, ``val_ema/top5`` and ``val_ema/loss`` beside the raw model's
``val/*``. Every checkpoint Lightning writes (``last.ckpt``, ``best-*``, the preemption
``hpc_ckpt_N.ckpt``) holds the average under ``checkpoint["callbacks"]["EMA"]``, and a resumed fit
continues it. ``trainer.artifacts.export.ema_state_dict`` and ``choose_weights`` read it back for export,
validate, predict and load_pretrained (``--weights ema|raw``); they live there, beside the reading of
the raw weights, so that those verbs need not import Lightning or timm.

Why a callback, not a part of the Classifier: as a submodule of the LightningModule the average
would be wrapped by DDP (its buffers broadcast every step) and cast by the precision plugin
(bfloat16 under ``bf16-true``); as a callback it stays float32 and outside both, and Lightning
saves and restores a callback's state in every checkpoint with no code in the module, whose
``state_dict`` stays the raw network (resume, export and validate read it as before). Lightning's
own ``EMAWeightAveraging`` swaps the average into the model for validation (no ``val/*`` beside
``val_ema/*``), and the ``AveragedModel`` under it reads its update count back to the host at every
update (a GPU sync); timm's ``ModelEmaV3`` does neither.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from trainer.artifacts.export import EMA_KEY

log = logging.getLogger("imagenet_trainer")


def network(model: nn.Module) -> nn.Module:
    """``model`` without torch.compile's wrapper: the state_dict keys are the network's own."""
    return getattr(model, "_orig_mod", model)


class EMA(pl.Callback):
    """Keeps, validates and checkpoints a float32 EMA of ``pl_module.model`` during a fit.

    The update runs on every rank from the same (all-reduced) parameters, so the averaged parameters
    agree across ranks. BatchNorm statistics are each rank's own between steps (DDP broadcasts rank 0's
    to the raw model at each forward only), so the average's are broadcast from rank 0 before each
    validation, once per epoch; checkpoints hold rank 0's.
    """

    def __init__(self, decay: float, every_n_steps: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay={decay} must be between 0 and 1 (e.g. 0.9999)")
        if every_n_steps < 1:
            raise ValueError(f"ema.every_n_steps={every_n_steps} must be at least 1")
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.ema = None  # timm's ModelEmaV3, built at the fit's start
        self.last_step = 0  # the global step of the latest update
        self._restored: Optional[dict[str, Any]] = None  # a checkpoint's state, until the average exists

    @property
    def state_key(self) -> str:
        return EMA_KEY  # fixed, not the class name: readers of checkpoints look it up

    @property
    def module(self) -> Optional[nn.Module]:
        """The averaged network (float32, eval mode), once the fit has started."""
        return None if self.ema is None else self.ema.module

    # --- the average -------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here the network is on its device and in its training dtype, and a checkpoint being
        # resumed has been loaded into it (and its state into load_state_dict below).
        from timm.utils.model_ema import ModelEmaV3  # here: timm is a slow import

        self.ema = ModelEmaV3(network(pl_module.model), decay=self.decay, dtype=torch.float32)
        self.ema.requires_grad_(False)
        if self._restored is not None:
            self._load(self._restored)
            self._restored = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # global_step counts optimiser steps: it does not move on a batch that only accumulates.
        step = trainer.global_step
        if self.ema is not None and step > self.last_step and step % self.every_n_steps == 0:
            # decay as a python float and foreach lerps on the device: nothing is read back to the host.
            self.ema.update(network(pl_module.model))
            self.last_step = step

    # --- validation --------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is not None and trainer.world_size > 1:
            self._broadcast_buffers()

    @torch.no_grad()
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.ema is None:
            return
        images, labels = batch
        logits = self._logits(trainer, pl_module, images)
        n = labels.shape[0]
        num_classes = logits.shape[1]
        # Means over every image of every rank, as val/loss: Lightning sums each value x batch size and
        # the batch sizes over the ranks once, at the epoch's end (sync_dist); no per-step sync.
        values = {
            "val_ema/loss": pl_module.criterion(logits, labels),
            "val_ema/top1": multiclass_accuracy(logits, labels, num_classes, top_k=1, average="micro",
                                                validate_args=False),
            "val_ema/top5": multiclass_accuracy(logits, labels, num_classes, top_k=min(5, num_classes),
                                                average="micro", validate_args=False),
        }
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)

    def _logits(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: torch.Tensor) -> torch.Tensor:
        """The average's float32 logits, under the run's autocast and with the module's test-time
        flip (eval.tta_flip), as the raw model's are."""
        def forward(x: torch.Tensor) -> torch.Tensor:
            if pl_module.hparams.get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            with trainer.precision_plugin.forward_context():
                if not torch.is_autocast_enabled(x.device.type):
                    x = x.float()  # bf16-true feeds bfloat16 images; the average is float32
                return self.ema.module(x).float()

        logits = forward(images)
        if getattr(pl_module, "tta_flip", False):
            logits = (logits + forward(images.flip(-1))) / 2
        return logits

    def _broadcast_buffers(self) -> None:
        """Rank 0's floating-point buffers (BatchNorm statistics) on every rank, in one broadcast."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        buffers = [b for b in self.ema.module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()

    # --- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:  # saved before the fit started: pass on what was restored, if anything
            return dict(self._restored or {})
        return {
            "decay": self.decay,
            "every_n_steps": self.every_n_steps,
            "last_step": self.last_step,
            "state_dict": self.ema.module.state_dict(),  # the network's own key names (conv1.weight, ...)
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it moves the model to its device: keep the state until
        # on_fit_start has built the average.
        if self.ema is None:
            self._restored = dict(state_dict)
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state["state_dict"])
        self.last_step = int(state.get("last_step", 0))
        saved = state.get("decay")
        if saved is not None and saved != self.decay:
            log.warning("the checkpoint's EMA was kept with ema.decay=%s; it continues with ema.decay=%s",
                        saved, self.decay)

