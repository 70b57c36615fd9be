"""One LightningDataModule for every backend.

``backend``: ``dali_gpu`` (DALI, JPEG decoding on the GPU), ``dali_cpu`` (DALI on the CPU),
``torchvision`` (Pillow in DataLoader workers), ``synthetic`` (random tensors, to time the model)
or ``auto``: dali_gpu when training on a GPU with DALI installed, dali_cpu when DALI is installed
but there is no GPU, torchvision when DALI cannot be imported.

``root`` is an ImageNet folder tree, or a pack of tar shards (``imagenet-trainer pack``: a folder
with a ``manifest.json``, :mod:`data_pipelines.shards`), which every backend reads without listing
anything; ``stage_to`` copies a pack to node-local disk first (:mod:`data_pipelines.staging`).

The training position survives a resume, the same way for every backend: this module's
``state_dict`` (epoch, batches trained) goes into each checkpoint and, on resume, positions the
training loader, so a resumed epoch feeds exactly the images that the interrupted one had not
trained on.

Loaders are built in the ``*_dataloader`` hooks, where the trainer knows the global rank and world
size (DALI pipelines cannot be pickled to other processes anyway). Shard = global rank, never the
local rank: on 4 nodes the local rank would make each node read the same quarter of the data.
"""
from __future__ import annotations

import logging
import os
from functools import cached_property

import pytorch_lightning as pl
import torch

from data_pipelines import augment, layout, shards
from data_pipelines.resolution import ResolutionSchedule
from data_pipelines.sharding import steps_per_epoch

log = logging.getLogger(__name__)


def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent, with a warning
        return False
    return True


class BackendError(ValueError):
    """The requested backend cannot run here; the message says what to use instead."""


def resolve_backend(backend: str, on_gpu: bool) -> str:
    """The concrete backend for ``backend`` (which may be ``auto``); fails early on impossible ones."""
    if backend == "auto":
        if dali_importable():
            return "dali_gpu" if on_gpu else "dali_cpu"
        return "torchvision"
    if backend.startswith("dali") and not dali_importable():
        raise BackendError(
            f"data.backend={backend} needs NVIDIA DALI, which cannot be imported here: "
            f"pip install 'imagenet-trainer[dali]', or use data.backend=torchvision"
        )
    if backend == "dali_gpu" and not on_gpu:
        raise BackendError(
            "data.backend=dali_gpu needs a CUDA GPU and trainer.accelerator=gpu (or auto with a GPU); "
            "none is in use here: use data.backend=dali_cpu or auto"
        )
    return backend


class ImageNetDataModule(pl.LightningDataModule):
    """Sizes: ``image_size`` is the training crop, or ``resolution`` gives it per epoch
    (progressive resizing, for every backend); validation resizes to ``val_resize`` and
    centre-crops ``val_image_size`` (``None``: ``image_size``).

    Augmentation, run where the backend decodes: ``crop`` (the training crop, one of
    ``augment.CROPS``: ``rrc``, random-resized; ``pad_crop``, resized to ``image_size`` and
    shifted by up to ``crop_padding`` px with black borders, as He et al. 2015 on CIFAR-10),
    ``auto_augment`` (one of ``augment.AUTO_AUGMENTS``), ``random_erasing`` (probability per
    image), ``repeated_augment`` (each chosen image fed that many times per epoch:
    ``sharding.train_indices``). The synthetic
    backend has no images to augment and ignores them; MixUp and CutMix are the Classifier's.
    """

    def __init__(
        self,
        *,
        root: str | None,
        backend: str,
        on_gpu: bool,
        batch_size: int,
        image_size: int,
        val_resize: int,
        num_workers: int,
        seed: int,
        filelist_cache: bool = True,
        stage_to: str | None = None,
        synthetic_size: int = 1281167,
        num_classes: int | None = None,
        gpu_dtype: str = "float32",
        channels_last: bool = False,
        val_image_size: int | None = None,
        resolution: ResolutionSchedule | None = None,
        auto_augment: str = "none",
        random_erasing: float = 0.0,
        repeated_augment: int = 1,
        crop: str = "rrc",
        crop_padding: int = augment.CROP_PADDING,
    ) -> None:
        super().__init__()
        self.root = root
        self.backend = resolve_backend(backend, on_gpu)
        self.on_gpu = on_gpu
        if backend == "auto":
            log.info("data.backend=auto chose %s", self.backend)
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_resize = val_resize
        self.val_image_size = val_image_size or image_size
        self.resolution = resolution
        self.auto_augment = augment.check_auto_augment(auto_augment)
        self.random_erasing = random_erasing
        self.repeated_augment = repeated_augment
        self.crop = augment.check_crop(crop, crop_padding)
        self.crop_padding = crop_padding
        self.num_workers = num_workers
        self.seed = seed
        self.filelist_cache = filelist_cache
        self.stage_to = stage_to
        self.synthetic_size = synthetic_size
        self._num_classes = num_classes
        # What dali_gpu emits: the dtype the model computes in (bf16/fp16 under mixed precision),
        # so no cast runs on the step's critical path. DALI on the CPU stays float32 (faster there).
        self.gpu_dtype = gpu_dtype
        # The model's memory format, produced by the DALI loaders themselves: the model's own
        # conversion then finds the batch in that format already and copies nothing.
        self.channels_last = channels_last
        self._resume: dict | None = None  # data position restored from a checkpoint
        if self.backend != "synthetic" and not root:
            raise ValueError("data.root is not set: pass data.root=/path/to/imagenet")
        self.sharded = self.backend != "synthetic" and shards.is_sharded(root)
        if stage_to and not self.sharded and self.backend != "synthetic":
            raise layout.DataLayoutError(
                f"data.stage_to={stage_to} copies a pack of tar shards to node-local disk, but data.root={root} "
                f"has no manifest.json: make a pack with `imagenet-trainer pack {root} PACK_DIR` and pass "
                f"data.root=PACK_DIR, or unset data.stage_to"
            )

    # --- the tree: scanned once, lazily ---------------------------------------------------

    @cached_property
    def splits(self) -> tuple[layout.Split | shards.ShardSplit, layout.Split | shards.ShardSplit]:
        """(train, val). A pack: its manifest's shards (staged to ``stage_to`` first, when set).
        A tree: listed once per job: the job's first process lists each split into the
        file-list cache and the others read it (data_pipelines/filelist.py). With
        ``filelist_cache=False`` every process scans the tree itself."""
        if self.sharded:
            root = self.root
            if self.stage_to:
                from data_pipelines.staging import staged_root

                root = staged_root(self.root, self.stage_to)
            manifest = shards.read_manifest(root)
            return manifest.train, manifest.val
        if self.filelist_cache:
            from data_pipelines.filelist import cached_split, launch_position

            # Read from the launcher's environment: this runs before any process group exists
            # (the model's class count comes from here), so the trainer's rank is not known yet.
            launch = launch_position(os.environ)
            train = cached_split(self.root, "train", launch=launch)
            return train, cached_split(self.root, "val", classes=train.classes, launch=launch)
        return layout.scan_dataset(self.root)

    @property
    def classes(self) -> list[str]:
        """Class names in index order (wnids, sorted); synthetic data has numbered classes."""
        if self.backend == "synthetic":
            return [f"class{i}" for i in range(self._num_classes or 1000)]
        return self.splits[0].classes

    # --- distributed position ------------------------------------------------------------

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # --- data position: saved in every checkpoint ---------------------------------------------

    def state_dict(self) -> dict:
        """The data position, one contract for every backend: the epoch, and the number of its
        batches whose training step has run when the checkpoint is written.

        Lightning saves this in each checkpoint. Its counter ``processed`` moves when a batch's
        step (forward, backward, optimizer) is done, so it is right wherever the checkpoint is
        written: at a step's start (trainer/preemption.py: the batch just fetched is not trained
        yet and must be fed again), at a step's end (ModelCheckpoint: that batch is trained), or at
        the epoch's end. What the loader fetched ahead does not count: on resume the training
        loader skips exactly ``batches_done`` batches of the epoch, then feeds the rest.
        (``completed``, the other counter, lags by one inside ``on_train_batch_end``.)
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches_done": int(done)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None

    _restart_epoch = False  # set by restart_epoch()

    def restart_epoch(self) -> None:
        """Resume at the start of the checkpoint's epoch, not after its ``batches_done``: for a
        resume whose world size or batch size differs from the checkpoint's, where that count is of
        batches of another size. Call before ``fit``, which loads the position."""
        self._restart_epoch = True

    def _resume_position(self) -> tuple[int, int] | None:
        """(epoch, batches done) from the checkpoint being resumed, if any."""
        if not self._resume:
            return None
        return int(self._resume["epoch"]), 0 if self._restart_epoch else int(self._resume["batches_done"])

    # --- loaders ---------------------------------------------------------------------------

    def train_dataloader(self):
        rank, world = self._rank_world()
        if self.backend == "synthetic":
            loader = self._synthetic(steps_per_epoch(self.synthetic_size, world, self.batch_size), self.image_size,
                                     self.resolution)
            if (position := self._resume_position()) is not None:
                loader.set_epoch(position[0])  # Lightning says so too, at the epoch's start
            return loader
        split = self.splits[0]
        if self.backend == "torchvision":
            from data_pipelines.torchvision_loader import build_train_loader

            return build_train_loader(
                *_files_labels(split), batch_size=self.batch_size, image_size=self.image_size,
                num_workers=self.num_workers, seed=self.seed, shard_id=rank, num_shards=world,
                resume=self._resume_position(), resolution=self.resolution, auto_augment=self.auto_augment,
                random_erasing=self.random_erasing, repeats=self.repeated_augment, crop=self.crop,
                crop_padding=self.crop_padding,
            )
        loader = self._dali(split, train=True, rank=rank, world=world)
        if (position := self._resume_position()) is not None:
            loader.seek(*position)
        return loader

    def val_dataloader(self):
        rank, world = self._rank_world()
        if self.backend == "synthetic":
            return self._synthetic(max(1, 50000 // (world * self.batch_size)), self.val_image_size)
        split = self.splits[1]
        if self.backend == "torchvision":
            from data_pipelines.torchvision_loader import build_val_loader

            return build_val_loader(
                *_files_labels(split), batch_size=self.batch_size, image_size=self.val_image_size,
                val_resize=self.val_resize, num_workers=self.num_workers, shard_id=rank, num_shards=world,
            )
        return self._dali(split, train=False, rank=rank, world=world)

    def _synthetic(self, num_batches: int, image_size: int, resolution: ResolutionSchedule | None = None):
        from data_pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(
            num_batches=num_batches, batch_size=self.batch_size, image_size=image_size, resolution=resolution,
            num_classes=len(self.classes), seed=self.seed,
            device=self.trainer.strategy.root_device if (self.on_gpu and self.trainer is not None) else "cpu",
            dtype=getattr(torch, self.gpu_dtype) if self.on_gpu else torch.float32, channels_last=self.channels_last,
        )

    def _dali(self, split: layout.Split | shards.ShardSplit, *, train: bool, rank: int, world: int):
        from data_pipelines.dali import DALILoader, PipelineOptions

        on_gpu = self.backend == "dali_gpu"
        device_id = None
        if on_gpu:
            device_id = self.trainer.strategy.root_device.index if self.trainer is not None else 0
        # dali_cpu on a GPU run: the uint8 batch goes to the GPU and is normalised there.
        output_device = self.trainer.strategy.root_device if (self.on_gpu and self.trainer is not None) else "cpu"
        options = PipelineOptions(
            image_size=self.image_size, val_resize=self.val_resize, device="gpu" if on_gpu else "cpu",
            device_id=device_id, num_threads=max(1, self.num_workers),
            dtype=self.gpu_dtype if self.on_gpu else "float32", output_device=output_device,
            channels_last=self.channels_last, val_image_size=self.val_image_size, resolution=self.resolution,
            auto_augment=self.auto_augment, random_erasing=self.random_erasing, crop=self.crop,
            crop_padding=self.crop_padding,
        )
        return DALILoader(*_files_labels(split), train=train, batch_size=self.batch_size, shard_id=rank,
                          num_shards=world, seed=self.seed, options=options, repeats=self.repeated_augment)


def _files_labels(split: layout.Split | shards.ShardSplit) -> tuple:
    """What the loaders take: a tree's ``(files, labels)``, or a pack's split (labels in its shards)."""
    return (split, None) if isinstance(split, shards.ShardSplit) else (split.files, split.labels)
