"""The loader Lightning iterates: :class:`DALILoader`, one rank's batches of a source, rebuilt every
epoch in the source's order, with a position a resumed run seeks to; and its
:class:`PipelineOptions` (how it decodes and hands over its batches).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import augment, sharding
from ..buffers import BufferPool
from ..resolution import ResolutionSchedule, train_size
from ..sources import Source, as_source
from . import transfer
from .errors import is_data_error
from .graphs import pipeline_seed, require_dali, train_pipeline, val_pipeline


@dataclass(frozen=True)
class PipelineOptions:
    """How a :class:`DALILoader` decodes and hands over its batches; what it reads, for which
    rank, is the loader's own arguments. Checked when made: a bad value fails here, by name.

    ``device``: "gpu" (nvJPEG, the ``mixed`` decoder, on CUDA device ``device_id``) or "cpu"
    (libjpeg-turbo). ``dtype``: of the normalised images (float32, float16 or bfloat16; a torch
    dtype is accepted). ``output_device``: where a CPU pipeline's uint8 batches are normalised
    (``None``: handed over as uint8). ``hw_decoder_load``: the share of images given to the
    A100/H100 hardware JPEG decoder. ``use_mmap``: read files through mmap (off for some
    network filesystems).

    Sizes: ``image_size`` is the training crop, unless ``resolution`` gives one per epoch
    (:meth:`train_size`); validation resizes the shorter side to ``val_resize`` and centre-crops
    ``val_image_size`` (``None``: ``image_size``). Augmentation: ``crop`` (the training crop,
    one of :data:`augment.CROPS`; ``crop_padding``: pad_crop's pixels on each side),
    ``auto_augment`` (one of :data:`augment.AUTO_AUGMENTS`, run by DALI on the decoding device)
    and ``random_erasing`` (a probability per image, applied to the finished batch on the device
    it is handed over on).
    """

    image_size: int = 224
    val_resize: int = 256
    val_image_size: int | None = None
    resolution: ResolutionSchedule | None = None
    auto_augment: str = "none"
    random_erasing: float = 0.0
    crop: str = "rrc"
    crop_padding: int = augment.CROP_PADDING
    device: str = "gpu"
    device_id: int | None = None
    num_threads: int = 4
    dtype: str = "float32"
    prefetch: int = 2
    hw_decoder_load: float = 0.65
    use_mmap: bool = True
    output_device: str | torch.device | None = "cpu"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):
            names = {v: k for k, v in transfer.DTYPES.items()}
            object.__setattr__(self, "dtype", names.get(self.dtype, str(self.dtype)))
        if self.dtype not in transfer.DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(transfer.DTYPES)}")
        if self.device not in ("gpu", "cpu"):
            raise ValueError(f"device={self.device!r}: expected 'gpu' or 'cpu'")
        if self.device == "gpu" and self.device_id is None:
            raise ValueError("device='gpu' needs device_id (the CUDA device index of this rank)")
        crop_name = "image_size" if self.val_image_size is None else "val_image_size"
        if self.val_image_size is None:
            object.__setattr__(self, "val_image_size", self.image_size)
        if self.val_resize < self.val_image_size:
            raise ValueError(f"val_resize={self.val_resize} is smaller than {crop_name}={self.val_image_size}")
        augment.check_auto_augment(self.auto_augment)
        augment.check_crop(self.crop, self.crop_padding)
        if not 0 <= self.random_erasing <= 1:
            raise ValueError(f"random_erasing={self.random_erasing}: a probability, in [0, 1]")
        if self.num_threads < 1 or self.prefetch < 1:
            raise ValueError("num_threads and prefetch must be at least 1")
        # DALI's device name is "gpu", torch's "cuda": a GPU pipeline's batches stay on its device.
        output = torch.device("cuda", self.device_id) if self.device == "gpu" else self.output_device
        object.__setattr__(self, "output_device", None if output is None else torch.device(output))
        if self.device == "cpu":
            object.__setattr__(self, "device_id", None)

    def train_size(self, epoch: int) -> int:
        """The training crop size of ``epoch``."""
        return train_size(epoch, self.image_size, self.resolution)


class DALILoader:
    """Batches ``(images, labels)`` of one rank, rebuilt from the source's order every epoch.

    What it reads: ``source``, a :class:`data_pipelines.sources.Source` (a folder tree's split or
    a pack's), or image files given with their ``labels`` (:func:`sources.as_source`). It asks the
    source for the ids of each epoch and for its DALI reader, never which kind it is.

    How it decodes and where its batches go are its ``options`` (:class:`PipelineOptions`).
    ``images`` are normalised NCHW float tensors, ``labels`` int64 of shape [N], both on GPU
    ``device_id`` for ``device="gpu"``. With ``device="cpu"`` the pipeline hands over uint8 pixels,
    which are moved to ``output_device`` (default: the CPU) and normalised there, so a GPU that
    trains on DALI-CPU batches receives a quarter of the bytes and does the arithmetic itself;
    ``output_device=None`` yields them as uint8, for a caller that normalises them itself.
    ``channels_last``: the images come in the channels_last memory format the model computes in
    (made by DALI or by the normalisation, not by a copy of the batch).

    Training: ``len()`` full batches, the same on every rank; validation: this rank's contiguous
    slice once, the last batch possibly partial.

    The loader tracks its position: after the last batch of epoch ``e`` it stands at epoch
    ``e + 1``, so iterating it again gives the next epoch without ``set_epoch``.
    ``position()`` is ``(epoch, step)`` with ``step`` the batches of that epoch handed out so far;
    ``seek(epoch, step)`` makes it feed that epoch from batch ``step``. A resumed fit does not use
    the handed-out count: a batch is handed out before its step runs, and a checkpoint may be
    written in between. The DataModule saves the batches *trained* and seeks to that
    (``ImageNetDataModule.state_dict``). The loader has no ``state_dict``, so Lightning keeps no
    second, disagreeing position. Validation always reads its whole slice. The pipeline is built
    lazily, at the first batch requested, so ``set_epoch`` or ``seek`` called after ``iter()``
    but before the first batch still count.

    Random crops and flips come from a DALI seed derived from (``seed``, epoch, ``shard_id``, first
    step): the same run gives the same batches; a resumed epoch feeds the same images as the
    uninterrupted one would, with freshly drawn (still reproducible) crops. So do the automatic
    augmentations and the erased boxes. ``repeats`` > 1: repeated augmentation
    (``sharding.train_indices``). Each epoch's pipeline crops to that epoch's size
    (``options.train_size``), so progressive resizing needs nothing else.
    """

    def __init__(
        self,
        source: Source | Sequence[str],
        labels: Sequence[int] | None = None,
        *,
        train: bool,
        batch_size: int,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        options: PipelineOptions,
        repeats: int = 1,
    ) -> None:
        require_dali()
        self.source = as_source(source, labels)
        self.reader = self.source.dali_reader()
        _check_arguments(options, shard_id, num_shards, batch_size)
        self.train = train
        self.batch_size = batch_size
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.seed = seed
        self.options = options
        self.repeats = repeats
        self._epoch = 0
        self._step = 0
        self._pipe = None
        self._iter = None
        # Host batches written again once released: a fresh one costs page faults every batch.
        self._buffers = BufferPool(keep=8)
        # Lightning calls ``loader.sampler.set_epoch(epoch)`` at every epoch start, as for a
        # DataLoader with a DistributedSampler; this keeps the loader on Lightning's epoch when an
        # epoch ends early (limit_train_batches, max_steps) without wiring in the caller.
        self.sampler = sharding.EpochSetter(self)
        self.batch_sampler = None  # read beside ``sampler`` by Lightning's shuffle check
        if train:  # fail now, not at the first batch, when a rank would get no full batch
            sharding.steps_per_epoch(len(self.source), num_shards, batch_size)

    # -- position ---------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.train:
            return sharding.steps_per_epoch(len(self.source), self.num_shards, self.batch_size)
        n = len(sharding.val_indices(len(self.source), shard_id=self.shard_id, num_shards=self.num_shards))
        return math.ceil(n / self.batch_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Feed ``epoch`` next, from its first batch (unless already positioned inside it)."""
        if epoch != self._epoch:
            self._epoch, self._step = epoch, 0

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it handed out so far)."""
        return self._epoch, self._step

    def seek(self, epoch: int, step: int) -> None:
        """Feed ``epoch`` from its batch ``step`` next (``step == len(self)``: the next epoch)."""
        epoch, step = int(epoch), int(step)
        resumed = sharding.resume_point(epoch, step, len(self))  # checks the range
        self._epoch, self._step = resumed if self.train else (epoch, step)

    # -- the pipeline -----------------------------------------------------------------------
    def _indices(self) -> tuple[np.ndarray, int]:
        if not self.train:
            return self.source.val_ids(shard_id=self.shard_id, num_shards=self.num_shards), 0
        idx = self.source.train_ids(
            epoch=self._epoch,
            seed=self.seed,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            batch_size=self.batch_size,
            start_step=self._step,
            repeats=self.repeats,
        )
        return idx, self._step

    def _build(self, ids: np.ndarray, start_step: int):
        pipe = self.pipeline(ids, start_step)
        pipe.build()
        return pipe

    def pipeline(self, ids: np.ndarray, start_step: int = 0):
        """The DALI pipeline this loader runs over the sample ids ``ids`` (in that order) from
        ``start_step``, not built yet (building a GPU pipeline needs CUDA; defining its graph does not)."""
        o = self.options
        common = dict(
            batch_size=self.batch_size,
            num_threads=o.num_threads,
            device_id=o.device_id,
            seed=pipeline_seed(self.seed, self._epoch if self.train else 0, self.shard_id, start_step),
            prefetch_queue_depth=o.prefetch,
            device=o.device,
            dtype=o.dtype,
            channels_last=o.channels_last,
            hw_decoder_load=o.hw_decoder_load,
            use_mmap=o.use_mmap,
        )
        read = self.reader.read(np.asarray(ids, dtype=np.int64))
        if self.train:
            return train_pipeline(read, crop=o.train_size(self._epoch), auto_augment=o.auto_augment, crop_mode=o.crop,
                                  crop_padding=o.crop_padding, enable_conditionals=o.auto_augment != "none", **common)
        return val_pipeline(read, image_size=o.val_image_size, val_resize=o.val_resize, **common)

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.release()  # the previous epoch's pipeline, if its iteration was abandoned
        idx, start = self._indices()
        if len(idx) == 0:  # a validation rank without images
            return
        steps, step = len(self), start
        size = self.options.train_size(self._epoch)
        erasing = self.options.random_erasing if self.train else 0.0
        # Its own stream, seeded like the pipeline's.
        rng = np.random.default_rng([self.seed, self._epoch, self.shard_id, start, 1]) if erasing else None
        pipe = self._pipe = self._build(idx, start)
        outputs = None
        try:
            while step < steps:
                try:
                    if outputs is None:  # the first batch is requested: start the pipeline
                        outputs = self._outputs(pipe, size)
                    images, labels = next(outputs)
                except StopIteration:
                    return
                except RuntimeError as err:
                    if not is_data_error(err):
                        raise
                    raise RuntimeError(self._failure(str(err), idx, step - start)) from err
                step += 1
                if self.train:  # the position moves when a batch is handed out
                    self._epoch, self._step = (self._epoch + 1, 0) if step == steps else (self._epoch, step)
                batch = self._hand_over(images, labels, rng)
                if step == steps:
                    # The last batch: free the pipeline (its threads, and the decoder's pinned host
                    # and device buffers, GBs with the mixed decoder) now, before the consumer
                    # validates or starts the next epoch, rather than when it asks past the end.
                    # The batch's tensors stay valid: DALI's outputs live as long as they are referenced.
                    outputs = None
                    self._release(pipe)
                yield batch
        finally:
            # Only this iteration's pipeline: an abandoned iterator may be collected after a
            # newer one started.
            self._release(pipe)

    def _failure(self, message: str, idx: np.ndarray, fed: int) -> str:
        """The source's message for a DALI data error met after ``fed`` batches of ``idx``: DALI was
        asked for the next batch; its reader may have failed a batch ahead of it and its decoder up
        to ``prefetch`` batches ahead."""
        first = fed * self.batch_size
        in_flight = idx[first : first + (self.options.prefetch + 2) * self.batch_size]
        return self.source.dali_failure(message, in_flight)

    def _outputs(self, pipe, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The built pipeline's batches as torch tensors ``(images, labels)``, as DALI made them
        (normalised on the GPU, uint8 from a CPU pipeline); ``size``: a CPU training crop's."""
        if self.options.device == "cpu" and self.train:
            # Crops of different sizes, which DALI's iterator cannot stack: run the pipeline
            # directly. ``run`` keeps ``prefetch`` batches decoding in DALI's threads meanwhile.
            while True:
                images, labels = transfer.resized_crops(pipe.run(), size=size, num_threads=self.options.num_threads,
                                                        buffers=self._buffers)
                yield images, self.reader.labels(labels)
        batches = self._iter = transfer.dali_batches(pipe)
        for images, labels in batches:
            yield images, self.reader.labels(labels)

    def _hand_over(self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator | None):
        """DALI's batch as the model's (:func:`transfer.model_batch`), random-erased when ``rng``."""
        o = self.options
        batch = transfer.model_batch(images, labels, dtype=transfer.DTYPES[o.dtype], channels_last=o.channels_last,
                                     device=o.output_device, buffers=self._buffers)
        if rng is not None:
            # On the finished batch, where it is handed over (the GPU for dali_gpu, the training
            # device for dali_cpu): one masked fill of the whole batch, rather than DALI's
            # fn.erase, whose boxes would be drawn per sample in the graph. After normalisation,
            # as torchvision's recipe erases (value 0: the mean colour).
            n, _, height, width = batch[0].shape
            augment.erase(batch[0], augment.erase_boxes(rng, n, height, width, o.random_erasing))
        return batch

    def _release(self, pipe) -> None:
        if self._pipe is pipe:
            self.release()
        else:
            pipe._shutdown()  # noqa: SLF001 - idempotent: a second call does nothing

    def release(self) -> None:
        """Free the current pipeline (its threads and buffers) now rather than at GC."""
        self._iter = None
        if self._pipe is not None:
            self._pipe._shutdown()  # noqa: SLF001 - frees it while the iterator still refers to it
            self._pipe = None


def _check_arguments(options: PipelineOptions, shard_id: int, num_shards: int, batch_size: int) -> None:
    if options.device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device='gpu' but CUDA is not available here: use device='cpu'")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} is outside [0, num_shards={num_shards})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
