"""One LightningDataModule for every backend.

``backend``: ``dali_gpu`` (DALI, JPEG decoding on the GPU), ``dali_cpu`` (DALI on the CPU),
``torchvision`` (Pillow in DataLoader workers), ``synthetic`` (random tensors, to time the model)
or ``auto``: dali_gpu when training on a GPU with DALI installed, dali_cpu when DALI is installed
but there is no GPU, torchvision when DALI cannot be imported.

``root`` is an ImageNet folder tree, or a pack of tar shards (``imagenet-trainer pack``: a folder
with a ``manifest.json``, :mod:`data_pipelines.shards`), which every backend reads without listing
anything; ``stage_to`` copies a pack to node-local disk first (:mod:`data_pipelines.staging`).
Either way each split becomes a source (:mod:`data_pipelines.sources`), made once, which the
loaders read without asking which kind it is.

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
from pathlib import Path

import pytorch_lightning as pl
import torch

from data_pipelines import layout, pack_format, shards
from data_pipelines.sources import FolderSource, PackSource, Source
from data_pipelines.resolution import ResolutionSchedule
from data_pipelines.sharding import steps_per_epoch
from data_pipelines.specs import AugSpec, DataSpec

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
    """The data of ``data`` (sizes, backend, root: :class:`DataSpec`), augmented as ``aug`` says
    (:class:`AugSpec`), where the backend decodes. The synthetic backend has no images to augment
    and ignores ``aug``; MixUp and CutMix are the Classifier's.

    ``on_gpu``: the model trains on a GPU. ``gpu_dtype``: what a GPU batch is made in, the dtype the
    model computes in (bf16/fp16 under mixed precision), so no cast runs on the step's critical
    path; DALI on the CPU stays float32 (faster there). ``channels_last``: the model's memory
    format, produced by the DALI loaders themselves, so the model's own conversion copies nothing.
    """

    def __init__(self, data: DataSpec, aug: AugSpec = AugSpec(), *, on_gpu: bool, gpu_dtype: str = "float32",
                 channels_last: bool = False) -> None:
        super().__init__()
        self.data, self.aug = data, aug
        self.backend = resolve_backend(data.backend, on_gpu)
        if data.backend == "auto":
            log.info("data.backend=auto chose %s", self.backend)
        self.on_gpu, self.gpu_dtype, self.channels_last = on_gpu, gpu_dtype, channels_last
        self._resume: dict | None = None  # data position restored from a checkpoint
        if self.backend != "synthetic" and not data.root:
            raise ValueError("data.root is not set: pass data.root=/path/to/imagenet")
        self.sharded = self.backend != "synthetic" and shards.is_sharded(data.root)
        if data.stage_to and not self.sharded and self.backend != "synthetic":
            raise layout.DataLayoutError(
                f"data.stage_to={data.stage_to} copies a pack of tar shards to node-local disk, but data.root="
                f"{data.root} has no manifest.json: make a pack with `imagenet-trainer pack {data.root} PACK_DIR` "
                f"and pass data.root=PACK_DIR, or unset data.stage_to"
            )

    @property
    def batch_size(self) -> int:
        return self.data.batch_size

    # --- the tree: scanned once, lazily ---------------------------------------------------

    @cached_property
    def splits(self) -> tuple[Source, Source]:
        """(train, val) sources. A pack: its manifest's shards (staged to ``stage_to`` first, when
        set). A tree: listed once per job: the job's first process lists each split into the
        file-list cache and the others read it (data_pipelines/filelist.py). With
        ``filelist_cache=False`` every process scans the tree itself."""
        root = self.data.root
        if self.sharded:
            if self.data.stage_to:
                from data_pipelines.staging import staged_root

                root = staged_root(root, self.data.stage_to)
            manifest = shards.read_manifest(root)
            return PackSource(manifest.train), PackSource(manifest.val)
        if self.data.filelist_cache:
            from data_pipelines.filelist import cached_split, launch_position

            # Read from the launcher's environment: this runs before any process group exists
            # (the model's class count comes from here), so the trainer's rank is not known yet.
            launch = launch_position(os.environ)
            train = cached_split(root, "train", launch=launch)
            val = cached_split(root, "val", classes=train.classes, launch=launch)
        else:
            train, val = layout.scan_dataset(root)
        return FolderSource.of(train), FolderSource.of(val)

    @property
    def classes(self) -> list[str]:
        """Class names in index order (wnids, sorted); synthetic data has numbered classes."""
        if self.backend == "synthetic":
            return [f"class{i}" for i in range(self.data.num_classes or 1000)]
        return self.splits[0].classes

    @cached_property
    def names(self) -> list[str] | None:
        """Each class's words ("tench, Tinca tinca"), aligned with :attr:`classes` ("" for a class
        left unnamed): a pack's manifest ``names``, a tree's ``ROOT/synset_words.txt``; None for
        synthetic data or when the data names no class. For people only: wnids stay the identifiers."""
        if self.backend == "synthetic":
            return None
        if self.sharded:
            # The source pack's manifest alone (a staged copy's is the same file): no shard is
            # looked at, nothing is staged for it.
            root = Path(self.data.root)
            return pack_format.manifest_names(pack_format.load_manifest(root), root / shards.MANIFEST)
        return layout.read_names(self.data.root, self.classes)

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
        if self._resume_override is not None:
            epoch, done = self._resume_override
            self._resume = {**(self._resume or {}), "epoch": epoch, "batches_done": done}

    _resume_override: tuple[int, int] | None = None  # set by resume_at()

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Resume at (``epoch``, ``batches_done``) instead of the checkpoint's data position: the
        NaN guard's rollback (trainer/cluster/guard.py) restores an earlier checkpoint but must not
        feed again the batches fed since it. Call before ``fit``, which loads the position."""
        self._resume_override = (int(epoch), int(batches_done))

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
        d = self.data
        if self.backend == "synthetic":
            loader = self._synthetic(steps_per_epoch(d.synthetic_size, world, d.batch_size), d.image_size, d.resolution)
            if (position := self._resume_position()) is not None:
                loader.set_epoch(position[0])  # Lightning says so too, at the epoch's start
            return loader
        split = self.splits[0]
        if self.backend == "torchvision":
            from data_pipelines.torchvision_loader import build_train_loader

            return build_train_loader(
                split, batch_size=d.batch_size, image_size=d.image_size, num_workers=d.num_workers,
                seed=d.seed, shard_id=rank, num_shards=world, resume=self._resume_position(),
                resolution=d.resolution, repeats=self.aug.repeated_augment, **self.aug.per_image(),
            )
        loader = self._dali(split, train=True, rank=rank, world=world)
        if (position := self._resume_position()) is not None:
            loader.seek(*position)
        return loader

    def val_dataloader(self):
        rank, world = self._rank_world()
        d = self.data
        if self.backend == "synthetic":
            return self._synthetic(max(1, 50000 // (world * d.batch_size)), d.val_crop)
        split = self.splits[1]
        if self.backend == "torchvision":
            from data_pipelines.torchvision_loader import build_val_loader

            return build_val_loader(
                split, batch_size=d.batch_size, image_size=d.val_crop, val_resize=d.val_resize,
                num_workers=d.num_workers, shard_id=rank, num_shards=world,
            )
        return self._dali(split, train=False, rank=rank, world=world)

    def _device(self):
        """Where batches go: the trainer's device on a GPU run, else the CPU."""
        return self.trainer.strategy.root_device if (self.on_gpu and self.trainer is not None) else "cpu"

    def _synthetic(self, num_batches: int, image_size: int, resolution: ResolutionSchedule | None = None):
        from data_pipelines.synthetic import SyntheticLoader

        return SyntheticLoader(
            num_batches=num_batches, batch_size=self.data.batch_size, image_size=image_size, resolution=resolution,
            num_classes=len(self.classes), seed=self.data.seed, device=self._device(),
            dtype=getattr(torch, self.gpu_dtype) if self.on_gpu else torch.float32, channels_last=self.channels_last,
        )

    def _dali(self, split: Source, *, train: bool, rank: int, world: int):
        from data_pipelines.dali import DALILoader, PipelineOptions

        d = self.data
        on_gpu = self.backend == "dali_gpu"
        device_id = None
        if on_gpu:
            device_id = self.trainer.strategy.root_device.index if self.trainer is not None else 0
        # dali_cpu on a GPU run: the uint8 batch goes to the GPU and is normalised there.
        options = PipelineOptions(
            image_size=d.image_size, val_resize=d.val_resize, device="gpu" if on_gpu else "cpu",
            device_id=device_id, num_threads=max(1, d.num_workers),
            dtype=self.gpu_dtype if self.on_gpu else "float32", output_device=self._device(),
            channels_last=self.channels_last, val_image_size=d.val_crop, resolution=d.resolution,
            **self.aug.per_image(),
        )
        return DALILoader(split, train=train, batch_size=d.batch_size, shard_id=rank, num_shards=world, seed=d.seed,
                          options=options, repeats=self.aug.repeated_augment)
