"""Callbacks: throughput and data-wait measurement, plain log lines for SLURM log files,
the best and last checkpoints, atomic checkpoint writes, and a grid of the training images as the
model gets them (captioned with their classes' names in W&B)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.plugins.io import TorchCheckpointIO

from data_pipelines import files


class Throughput(pl.Callback):
    """Logs images/s (per device and in total) and the fraction of time spent waiting for data.

    Measured over windows of ``every`` steps by wall clock: on a GPU the step itself runs
    asynchronously, but over a window the queue fills and the wall time is the true rate.
    Data wait is the time between the end of one step and the start of the next, which is where
    Lightning fetches the next batch. No host synchronisation is added.
    """

    def __init__(self, every: int = 50) -> None:
        self.every = max(1, every)
        self._reset(None)
        self.epoch_start = 0.0
        self._group = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # A CPU (gloo) group for the rates: summing them never waits for the GPU's queue.
            self._group = dist.new_group(backend="gloo")

    def teardown(self, trainer, pl_module, stage) -> None:
        self._group = None  # destroyed with the default group

    def _reset(self, now: float | None) -> None:
        self.window_start = now
        self.images = 0
        self.steps = 0
        self.wait = 0.0
        self.last_end: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start = time.perf_counter()
        self._reset(self.epoch_start)
        self.last_end = self.epoch_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.window_start is None:  # resumed mid-epoch: Lightning skips on_train_epoch_start
            self.epoch_start = self.window_start = time.perf_counter()
        if self.last_end is not None:
            self.wait += time.perf_counter() - self.last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.images += int(batch[1].shape[0])
        self.steps += 1
        self.last_end = now
        if self.steps >= self.every:
            elapsed = max(now - self.window_start, 1e-9)
            per_device = self.images / elapsed
            values = {
                "perf/images_per_sec": per_device,
                # What every rank did in its window, summed: a slow rank shows (rank 0's rate
                # times the world size would hide it). One small CPU all-reduce per log step.
                "perf/images_per_sec_total": sum_over_ranks(per_device, self._group),
                "perf/data_wait_frac": min(1.0, self.wait / elapsed),
            }
            # CPU tensors: Lightning would copy python floats to the GPU, blocking the host each time.
            pl_module.log_dict({k: torch.tensor(v) for k, v in values.items()}, on_step=True, on_epoch=False)
            self._reset(now)
            self.last_end = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # The slowest rank's time is the epoch's (one reduction per epoch).
        pl_module.log("perf/epoch_time_s", time.perf_counter() - self.epoch_start, on_step=False, on_epoch=True,
                      sync_dist=True, reduce_fx="max")


def sum_over_ranks(value: float, group) -> float:
    """``value`` summed over the ranks of ``group`` (a CPU process group), or ``value`` alone
    without one. Every rank of the group must call it at the same point."""
    if group is None:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return float(total[0])


class ProgressBar(TQDMProgressBar):
    """Lightning's terminal bar, showing the last training loss too.

    The module logs the loss without ``prog_bar=True``: Lightning reads ``prog_bar`` step values
    back to the host after every step (a GPU sync). The bar reads it only when it redraws, every
    ``refresh_rate`` steps.
    """

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss_step")
        if loss is not None:
            items["loss"] = f"{float(loss):.4g}"
        return items


class PlainProgress(pl.Callback):
    """One log line every ``every`` steps and one per validation, for non-terminal output
    (SLURM log files), where a progress bar would write thousands of carriage returns."""

    def __init__(self, every: int = 50, stream=None) -> None:
        self.every = max(1, every)
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()

    def _print(self, trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(f"[{time.perf_counter() - self.t0:8.1f}s] {text}", file=self.stream, flush=True)

    @staticmethod
    def _fmt(metrics: dict, keys: list[str]) -> str:
        parts = []
        for key in keys:
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4g}")
        return "  ".join(parts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = batch_idx + 1
        if step % self.every == 0 or step == trainer.num_training_batches:
            metrics = trainer.callback_metrics
            self._print(
                trainer,
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {step}/{trainer.num_training_batches}"
                f"  {self._fmt(metrics, ['train/loss_step', 'train/top1_step', 'perf/images_per_sec_total'])}",
            )

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self._print(trainer, f"validation epoch {trainer.current_epoch + 1}  "
                             f"{self._fmt(metrics, ['val/loss', 'val/top1', 'val/top5', 'val/images'])}")


class ReleaseValidationPipelines(pl.Callback):
    """Frees the validation loaders' pipelines (DALI's, with GBs of decoder buffers) when a
    validation pass ends, also one cut short: the sanity check's two batches, or
    ``limit_val_batches``. A loader that ran to its end has freed its pipeline already; one
    abandoned mid-way would otherwise keep it through the training epoch that follows."""

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self._release(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._release(trainer)

    @staticmethod
    def _release(trainer) -> None:
        loaders = trainer.val_dataloaders
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            release = getattr(loader, "release", None)
            if callable(release):
                release()


class RecordSamples(pl.Callback):
    """Appends one JSON line per trained batch to ``PREFIX.rank<R>.jsonl``: the epoch, the batch's
    index in it, the global step after its optimizer step, and its labels in order.

    For checking what a job trained on, e.g. that a requeued job resumed exactly where the
    interrupted one stopped: the per-step label sequences of two jobs are a fingerprint of the
    samples they fed (on a tree with one image per class they are the sample ids). A requeued job
    appends to the same files. A debugging aid, not for speed: reading the labels back makes the
    host wait for the GPU every step.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self._file = None

    def on_train_start(self, trainer, pl_module) -> None:
        path = self.prefix.with_name(f"{self.prefix.name}.rank{trainer.global_rank}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)  # a line at a time: complete up to any stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step,
                  "labels": batch[1].tolist()}
        self._file.write(json.dumps(record) + "\n")

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class BestAndLastCheckpoint(ModelCheckpoint):
    """``best-*.ckpt``: the top-k by the monitored metric, as Lightning's ModelCheckpoint keeps them;
    ``last.ckpt``: the newest state, after every training epoch and at the end of the fit, whatever
    the metric did.

    Lightning 2.6 writes ``last.ckpt`` only "if a checkpoint was actually saved in this step", i.e.
    when the metric improved: a crash after a plateau would resume from the last improvement and
    train those epochs again, and an export of ``last.ckpt`` would not be the final model. Here
    ``last.ckpt`` follows each epoch, validated or not (``trainer.check_val_every_n_epoch`` > 1).
    tests/test_checkpoints.py pins this against Lightning's behaviour.
    """

    def __init__(self, dirpath: str | Path, **kwargs) -> None:
        super().__init__(dirpath=dirpath, save_last=True, **kwargs)

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's state in the checkpoint by its class name: keep
        # ModelCheckpoint's, so a run checkpointed before this class existed resumes with its best score.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    # Each hook lets Lightning save first (best-*.ckpt, and last.ckpt when that improved): once
    # something is saved at a step, Lightning saves nothing more at that step.
    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # Lightning's save point is here
            self._save_last_unless_saved(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # After the epoch's validation when there is one (Lightning runs it inside the epoch); an
        # epoch without validation (check_val_every_n_epoch > 1) still moves last.ckpt.
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last_unless_saved(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_unless_saved(trainer)  # a fit stopped mid-epoch by max_steps

    def _save_last_unless_saved(self, trainer) -> None:
        # Skips the sanity check, trainer.validate() and a step already saved (by top-k or last).
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, then renames it over the target.

    A job killed while writing leaves a ``.tmp`` file, never a truncated ``last.ckpt`` that a
    resume would pick up; ``os.replace`` is atomic on POSIX filesystems. The data is synced to disk
    before the rename and the rename before this returns: after a crash of the node the final name
    holds the old checkpoint or the whole new one, never an empty file.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        # fsync'ed, renamed over path, the folder fsync'ed (files.replace_atomic); a fixed
        # temporary name: a killed job's leftover is overwritten by the next save, not kept.
        with files.atomic_path(path, fsync=True) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class RestartResumedEpoch(pl.Callback):
    """Makes Lightning train a resumed epoch from its first batch, with a DataModule told to
    ``restart_epoch()``. Lightning restores its count of the epoch's trained batches and would end
    the restarted epoch that many batches early.

    Resets the fit loop's batch counters for this epoch; tests/test_checkpoints.py fails when
    Lightning changes them. The global step (optimizer steps) is not touched.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        # After the loops' state is restored and their restart stage derived from it, before the
        # epoch loop resumes from its counters.
        loop = trainer.fit_loop.epoch_loop
        loop.batch_progress.current.reset()
        loop.reset_restart_stage()  # a checkpoint at a step's end would count that step again


class SampleGrid(pl.Callback):
    """At the start of a fit, the first ``count`` training images as the model gets them (decoded,
    cropped, augmented, mixed by the module's MixUp/CutMix, then un-normalised) in a grid of
    ``nrow`` columns, written to ``path``; logged to W&B as ``samples`` when a W&B logger is there,
    one entry per image captioned with its class (:func:`label_caption`: the short name and wnid
    when the module's hparams hold ``names``; a mixed image's two classes with their shares), which
    W&B's media panel shows under each image. Rank 0 only.

    It looks at the batches Lightning fetches for training anyway (``on_train_batch_start``), so the
    data order is untouched and a resume stays exact. The mixing is redrawn on a copy under a fork
    of the RNG state: the grid shows the draw the step is about to make, and the step still makes it.
    """

    def __init__(self, path: str | Path, count: int = 32, nrow: int = 8) -> None:
        self.path = Path(path)
        self.count = count
        self.nrow = nrow
        self._images: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []
        self._done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._done or not trainer.is_global_zero:
            return
        need = self.count - sum(len(x) for x in self._images)
        images, targets = batch[0], batch[1]
        mixing = getattr(pl_module, "mixing", None)
        if mixing is not None:  # on the whole batch: an image is mixed with its neighbour
            with torch.random.fork_rng(devices=[images.device.index] if images.is_cuda else []):
                images, targets = mixing(images.clone(), batch[1])
        self._images.append(images[:need].detach().cpu())
        # Captioned when written: reading a target's value here would be a host sync in a step.
        self._targets.append(targets[:need].detach().cpu())
        if need <= len(images):
            self._write(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._done and self._images:  # an epoch of fewer images than ``count``
            self._write(trainer)

    def _write(self, trainer) -> None:
        from pytorch_lightning.loggers import WandbLogger
        from torchvision.utils import make_grid, save_image

        from data_pipelines import IMAGENET_MEAN, IMAGENET_STD

        self._done = True
        images = torch.cat(self._images)
        hparams = getattr(trainer.lightning_module, "hparams", {})
        classes, names = hparams.get("classes"), hparams.get("names")
        captions = [label_caption(t, classes, names) for t in torch.cat(self._targets)]
        self._images, self._targets = [], []
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        if images.dtype == torch.uint8:  # a loader that hands over pixels (not the trainer's)
            images = images / 255
        else:
            images = images.float() * std + mean
        images = images.clamp(0, 1)
        grid = make_grid(images, nrow=self.nrow)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                # One entry per image: W&B shows each caption under its image (a grid's one caption
                # could only list the names, far from their cells).
                # uint8 HWC: W&B takes the pixels as they are (a float array it would rescale by its range).
                pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                logger.log_image(key="samples", images=list(pixels), step=trainer.global_step, caption=captions)


def class_label(index: int, classes: list[str] | None, names: list[str] | None) -> str:
    """Class ``index`` for a person: "tench (n01440764)" when named, else its wnid (or "#index")."""
    from data_pipelines.layout import short_name

    wnid = classes[index] if classes and index < len(classes) else f"#{index}"
    name = short_name(names[index]) if names and index < len(names) else ""
    # The wnid stays beside the name: names are not unique (ImageNet has two "crane"s).
    return f"{name} ({wnid})" if name else wnid


def label_caption(target: torch.Tensor, classes: list[str] | None, names: list[str] | None) -> str:
    """The caption of a training image whose target is ``target``: a class index, or a soft target
    (MixUp/CutMix) whose classes are listed by share, "tench (n01440764) 0.62 + goldfish (...) 0.38"."""
    if target.ndim == 0:
        return class_label(int(target), classes, names)
    shares = [(float(target[i]), int(i)) for i in torch.nonzero(target > 0).flatten()]
    # MixUp/CutMix mix two images; the two largest shares (a smoothed target has a little of every class).
    shares = sorted(shares, key=lambda s: -s[0])[:2]
    if len(shares) == 1:
        return class_label(shares[0][1], classes, names)
    return " + ".join(f"{class_label(i, classes, names)} {share:.2f}" for share, i in shares)
