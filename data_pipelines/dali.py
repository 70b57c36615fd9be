"""NVIDIA DALI input pipelines (GPU or CPU) and the loader Lightning iterates.

Sample order is ours, not DALI's: every epoch the loader asks :mod:`data_pipelines.sharding` for
the indices this rank feeds and builds a DALI pipeline whose reader reads exactly that list, in
that order (``random_shuffle=False``, one shard). A pack of tar shards is read the same way, in
:mod:`data_pipelines.shards`'s order, by DALI's webdataset reader (:class:`ShardSource`). Rebuilding costs about 0.2 s for a 160k-file
shard (ImageNet on 8 GPUs; 2.9 s for all 1.28M files on one), against minutes for the epoch. This gives exact sharding, the same number of
steps on every rank, the same sample sequence as the torchvision backend, and a resumable position
(resuming mid-epoch builds the pipeline from ``start_step``).

Bad images: DALI cannot skip a sample. A file it cannot read or decode (truncated, empty, not an
image) is a *critical* pipeline error: the pipeline becomes unusable and the loader raises a
``RuntimeError`` naming the file, so the job stops instead of hanging or silently training on
less data. DALI 2.4 names the file itself for a truncated JPEG ("Failed to decode sample #0 :
PATH") and an empty file ("File mapping failed: PATH"), but not for data that is no image at all
("nvImageCodec failure: '#4'"); then the loader decodes, with Pillow and nvImageCodec, the few
batches that were in flight when the error came and names the culprits it finds. The message
always ends with the command that finds every bad file at once: ``imagenet-trainer check-data
ROOT``. (Under ``srun``, add ``--kill-on-bad-exit=1`` so that the other ranks stop too rather
than wait in a collective until the NCCL timeout.) The naming is ``check.bad_file_message``'s.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import IMAGENET_MEAN, IMAGENET_STD, augment, check, normalize, sharding, shards
from .buffers import BufferPool
from .check import bad_file_message, is_data_error
from .resolution import ResolutionSchedule, train_size


# nvJPEG buffer sizes that fit the largest ImageNet image, so that the mixed decoder never
# reallocates mid-training (NVIDIA's ResNet-50 reference uses the same values).
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_PREALLOCATE_WIDTH_HINT = 5980
_PREALLOCATE_HEIGHT_HINT = 6430

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment, trivial_augment
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    _DALI_IMPORT_ERROR: BaseException | None = None
except (ImportError, OSError) as err:  # OSError: the wheel is there but a shared library is not
    _DALI_IMPORT_ERROR = err

    def pipeline_def(func=None, **_kwargs):  # type: ignore[no-redef]
        """Stand-in so that this module imports without DALI; calling a pipeline raises."""

        def wrap(f):
            @functools.wraps(f)
            def missing(*_args, **_kw):
                require_dali()

            return missing

        return wrap(func) if func is not None else wrap


def dali_available() -> bool:
    """True when NVIDIA DALI imports."""
    return _DALI_IMPORT_ERROR is None


def dali_import_error_message() -> str:
    """What to tell a user whose DALI does not import."""
    return (
        f"NVIDIA DALI is not usable here ({_DALI_IMPORT_ERROR!r}). Install the wheel matching "
        f"your CUDA major version, e.g. `pip install nvidia-dali-cuda130` (CUDA 13) or "
        f"`nvidia-dali-cuda120` (CUDA 12), or use the torchvision data backend"
    )


def require_dali() -> None:
    """Raise an ImportError with install instructions unless DALI imports."""
    if _DALI_IMPORT_ERROR is not None:
        raise ImportError(dali_import_error_message()) from _DALI_IMPORT_ERROR


def _normalize(images, *, crop: int, dtype: str, layout: str, mirror=None):
    """HWC uint8 -> ``layout`` ("CHW" or "HWC"), (x/255 - mean)/std, optional mirror; bfloat16
    is cast later in torch (DALI has no bfloat16 output)."""
    return fn.crop_mirror_normalize(
        images,
        crop=(crop, crop),
        mean=[m * 255 for m in IMAGENET_MEAN],
        std=[s * 255 for s in IMAGENET_STD],
        mirror=0 if mirror is None else mirror,
        output_layout=layout,
        dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT,
    )


class FileSource:
    """Images as files (an ImageNet folder tree), read by DALI's file reader in
    :mod:`sharding`'s order. Sample id: the position in ``files``."""

    def __init__(self, files: Sequence[str], labels: Sequence[int]) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def train_ids(self, **order) -> np.ndarray:
        return sharding.train_indices(len(self), **order)

    def val_ids(self, *, shard_id: int, num_shards: int) -> np.ndarray:
        return np.arange(len(self))[sharding.val_indices(len(self), shard_id=shard_id, num_shards=num_shards)]

    def reading(self, ids: np.ndarray):
        """A function that, called inside a pipeline definition, returns the reader's
        ``(encoded images, labels)`` nodes, reading ``ids`` in that order."""
        files, labels = [self.files[i] for i in ids], self.labels[ids].tolist()

        def read(use_mmap: bool):
            return fn.readers.file(
                files=files,
                labels=labels,
                random_shuffle=False,  # the order is sharding.py's
                num_shards=1,
                shard_id=0,
                pad_last_batch=True,
                dont_use_mmap=not use_mmap,
                name="Reader",
            )

        return read

    @staticmethod
    def to_labels(labels: torch.Tensor) -> torch.Tensor:
        return labels

    def error(self, message: str, in_flight: np.ndarray) -> str:
        return bad_file_message(message, [self.files[i] for i in in_flight], self.files)


class ShardSource:
    """A pack's split (:mod:`data_pipelines.shards`), read by DALI's webdataset reader in
    :mod:`shards`'s order: each pipeline gets index files that list exactly its samples, in order
    (:func:`shards.write_reader_indices`), written into a private folder removed with the source."""

    LABEL_WIDTH = 8  # the ``.cls`` digits, padded: class indices up to 10**8 - 1

    def __init__(self, split: shards.ShardSplit) -> None:
        self.split = split
        self._folder = shards.index_folder(split.name)

    def __len__(self) -> int:
        return len(self.split)

    def train_ids(self, **order) -> np.ndarray:
        return shards.train_ids(self.split, **order)

    def val_ids(self, *, shard_id: int, num_shards: int) -> np.ndarray:
        return shards.val_ids(self.split, shard_id=shard_id, num_shards=num_shards)

    def reading(self, ids: np.ndarray):
        """As :meth:`FileSource.reading`. The labels node is the ``.cls`` text padded with zeros
        to ``LABEL_WIDTH`` bytes (:meth:`to_labels` parses it): DALI reads components as bytes."""
        folder = Path(self._folder.name)
        for old in folder.iterdir():  # the previous pipeline's indices (read when it was built)
            old.unlink()
        paths, index_paths = shards.write_reader_indices(self.split, ids, folder)

        def read(use_mmap: bool):
            jpegs, cls = fn.readers.webdataset(
                paths=paths,
                index_paths=index_paths,
                ext=["jpg", "cls"],
                missing_component_behavior="error",
                random_shuffle=False,  # the order is shards.py's, in the indices
                num_shards=1,
                shard_id=0,
                pad_last_batch=True,
                dont_use_mmap=not use_mmap,
                name="Reader",
            )
            return jpegs, fn.pad(cls, fill_value=0, shape=[self.LABEL_WIDTH], axes=[0])

        return read

    @staticmethod
    def to_labels(labels: torch.Tensor) -> torch.Tensor:
        return shards.ascii_labels(labels)

    def error(self, message: str, in_flight: np.ndarray) -> str:
        """Names the image(s) among ``in_flight`` (the batches DALI had in flight) that do not
        decode when read again from their shards, as ``FileSource.error`` names files."""
        bad, lines = [], functools.lru_cache(maxsize=None)(self.split.index_lines)
        for sample in dict.fromkeys(np.asarray(in_flight, dtype=np.int64).tolist()):
            shard, position = (int(v[0]) for v in self.split.locate(np.array([sample])))
            fields = lines(shard)[position].split()
            with open(self.split.shards[shard].tar, "rb") as tar:
                tar.seek(int(fields[1]))
                reason = check.check_bytes(tar.read(int(fields[2])))
            if reason:
                bad.append(f"  {self.split.shards[shard].tar}: {fields[3]} (image {position} of its index): {reason}")
        head = (f"DALI could not decode {len(bad)} image(s) of the pack {self.split.root}:\n" + "\n".join(bad) + "\n"
                if bad else f"DALI failed on the pack {self.split.root}, and the images of the batches in flight "
                            f"all decode when read again, so the cause may be I/O or memory.\n")
        return (
            f"{head}The run stopped: DALI cannot skip a sample. `imagenet-trainer pack` decodes every image "
            f"before packing, so a shard that fails was damaged later or not written by it: "
            f"`imagenet-trainer check-data {self.split.root}` checks every shard against manifest.json's sha256 "
            f"(data.stage_to copies are checked at every job start); re-run `imagenet-trainer pack` to rewrite "
            f"damaged shards. DALI said: {check._dali_reason(message)}"
        )


def _mixed_decoder_hints(hw_decoder_load: float) -> dict[str, Any]:
    return dict(
        device_memory_padding=_DEVICE_MEMORY_PADDING,
        host_memory_padding=_HOST_MEMORY_PADDING,
        preallocate_width_hint=_PREALLOCATE_WIDTH_HINT,
        preallocate_height_hint=_PREALLOCATE_HEIGHT_HINT,
        hw_decoder_load=hw_decoder_load,
        # nvJPEG's default chroma upsampling differs from libjpeg-turbo's (which the CPU decoder and
        # Pillow use); the "fancy" one matches them, so dali_gpu and dali_cpu feed the same pixels.
        jpeg_fancy_upsampling=True,
    )


@functools.lru_cache(maxsize=None)
def _resize_pool(num_threads: int) -> ThreadPoolExecutor:
    """Threads for :func:`resize_and_flip`, one pool per thread count, shared by every loader of
    the process (idle between batches; a pipeline is rebuilt each epoch)."""
    return ThreadPoolExecutor(num_threads, thread_name_prefix="dali-cpu-resize")


def resize_and_flip(
    crops: Sequence[torch.Tensor], flips: Sequence[bool], *, size: int, num_threads: int, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HWC uint8 crops of any sizes -> one ``[N, 3, size, size]`` uint8 batch, each crop mirrored
    where its flip is true: the CPU training pipeline's resize, run by the loader.

    Why not DALI's ``fn.resize``: its CPU resampler took about 1 ms of a core per 224x224 crop
    here, more than the ROI decode before it (0.7-0.9 ms); torch's antialiased bilinear kernel
    for uint8 (the one torchvision's RandomResizedCrop runs on tensors, matching Pillow's filter
    to within one grey level) takes 0.14-0.19 ms. Why in the loader and not in the pipeline: DALI
    runs a pipeline's CPU operators one after another, so a resize inside it would wait for the
    batch's decode and the decode for the resize; here the next batches decode in DALI's threads
    (``prefetch`` ahead) while these threads resize this one. Torch releases the GIL in the kernel.
    ``out``: the uint8 batch to write (else a new one).
    """
    batch = torch.empty((len(crops), 3, size, size), dtype=torch.uint8) if out is None else out
    chunk = -(-len(crops) // num_threads)
    parts = [
        _resize_pool(num_threads).submit(_resize_into, batch, start, crops[start : start + chunk], flips[start : start + chunk])
        for start in range(0, len(crops), chunk)
    ]
    for part in parts:
        part.result()  # re-raises a worker's error here
    return batch


def _resize_into(batch: torch.Tensor, start: int, crops: Sequence[torch.Tensor], flips: Sequence[bool]) -> None:
    size = batch.shape[-2:]
    for i, (crop, flip) in enumerate(zip(crops, flips), start):
        # A channels_last view of the HWC crop: torch's fastest uint8 path, no copy of the input.
        chw = crop.permute(2, 0, 1).unsqueeze(0)
        if chw.shape[-2:] == size:  # already the size (pad_crop's crops): kept as they are
            resized = chw[0]
        else:
            resized = F.interpolate(chw, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        batch[i] = resized.flip(-1) if flip else resized


def _auto_augment(images, name: str, shape):
    """DALI's own automatic augmentation ``name`` (:data:`augment.AUTO_AUGMENTS`) of HWC uint8
    ``images`` on their device, with torchvision's settings (``data_pipelines/augment.py``).
    ``shape``: the images' (H, W), a DataNode for crops of different sizes: translations are a
    fraction of each image's side. It picks operations per sample with ``if`` on DataNodes, so the
    pipeline must be defined with ``enable_conditionals=True`` (:meth:`DALILoader.pipeline` does)."""
    common = dict(shape=shape, fill_value=augment.FILL, interp_type=types.INTERP_LINEAR,
                  num_magnitude_bins=augment.MAGNITUDE_BINS)
    if name == "trivial_wide":
        return trivial_augment.trivial_augment_wide(
            images, max_translate_rel=augment.TRIVIAL_WIDE_MAX_TRANSLATE, **common)
    if name == "rand_augment":
        return rand_augment.rand_augment(
            images, n=augment.RAND_AUGMENT_OPS, m=augment.RAND_AUGMENT_MAGNITUDE,
            max_translate_rel=augment.RAND_AUGMENT_MAX_TRANSLATE, **common)
    raise ValueError(f"auto_augment={name!r}: expected one of {', '.join(augment.AUTO_AUGMENTS)}")


@pipeline_def(enable_conditionals=False)
def train_pipeline(
    read,
    *,
    crop: int = 224,
    device: str = "gpu",
    dtype: str = "float32",
    channels_last: bool = False,
    hw_decoder_load: float = 0.65,
    use_mmap: bool = True,
    auto_augment: str = "none",
    crop_mode: str = "rrc",
    crop_padding: int = augment.CROP_PADDING,
):
    """Read the samples ``read`` names, in order (``read(use_mmap)`` makes the reader's
    ``(encoded, labels)`` nodes: :meth:`FileSource.reading`, :meth:`ShardSource.reading`); the
    training crop ``crop_mode`` (:data:`augment.CROPS`) to ``crop`` x ``crop``: ``rrc``, a
    random-resized crop (area [0.08, 1], aspect [3/4, 4/3]) decoded as a region of interest and
    resized; ``pad_crop``, the whole image decoded, resized to ``crop`` x ``crop``, and a
    ``crop`` x ``crop`` window shifted by a random whole number of pixels in
    [-``crop_padding``, ``crop_padding``] along each axis, the uncovered part black (a slice
    that pads: torchvision's Pad + RandomCrop in one operator); then a random flip.
    ``auto_augment`` (not "none"): DALI's TrivialAugmentWide or RandAugment on the uint8 crop,
    on the pipeline's device (call with ``enable_conditionals=True`` then).

    ``device="gpu"``: decoded by nvJPEG (``mixed``), resized, flipped and normalised on the GPU:
    CHW in ``dtype`` (HWC with ``channels_last``: the loader views it as a channels_last NCHW
    tensor, so the model gets its memory layout without a copy); outputs ``(images, labels)``.
    ``device="cpu"``: decoded by libjpeg-turbo; outputs ``(crops, flips, labels)``, the crops
    HWC uint8 at their decoded sizes (pad_crop's: ``crop`` x ``crop`` already; ``dtype`` is not
    used). The loader resizes and flips them (:func:`resize_and_flip`) while DALI decodes the
    next batch, and hands over **uint8** CHW:
    the consumer normalises on its device (:func:`data_pipelines.normalize`), which moves 4x
    fewer bytes and keeps the normalisation off the CPU when training runs on a GPU.

    Pipeline arguments (``batch_size``, ``num_threads``, ``device_id``, ``seed``,
    ``prefetch_queue_depth``) are given at call time, as for any ``@pipeline_def``.
    """
    jpegs, labels_out = read(use_mmap)
    gpu = device == "gpu"
    augment.check_crop(crop_mode, crop_padding)
    decoding = dict(
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,  # CMYK, grayscale and PNG all become 3-channel RGB
        **(_mixed_decoder_hints(hw_decoder_load) if gpu else {}),
    )
    if crop_mode == "pad_crop":
        images = _pad_crop(fn.decoders.image(jpegs, **decoding), crop, crop_padding)
        flip = fn.random.coin_flip(probability=0.5)
        if auto_augment != "none":  # on the finished crop, as torchvision orders it
            images = _auto_augment(images, auto_augment, shape=(crop, crop))
        if not gpu:  # crop x crop already: the loader's resize keeps them as they are, and flips
            return images, flip, labels_out
        images = _normalize(images, crop=crop, dtype=dtype, layout=_layout(channels_last), mirror=flip)
        return images, labels_out.gpu()
    images = fn.decoders.image_random_crop(
        jpegs,
        random_area=list(augment.RRC_SCALE),
        random_aspect_ratio=list(augment.RRC_RATIO),
        num_attempts=100,
        **decoding,
    )
    flip = fn.random.coin_flip(probability=0.5)
    if not gpu:  # the crops, their flips and labels: the loader resizes (resize_and_flip)
        if auto_augment != "none":
            # Augmented at the crop's own size, before the loader's resize: the auto-augment
            # operators take crops of any size (translations as a fraction of each crop's side,
            # rotations and shears scale-free, colour operations per pixel), so the loader's fast
            # resize stays outside DALI. Against torchvision's order (resize, then augment) only
            # rounding differs, and the 3x3 sharpness kernel acts at the crop's scale.
            images = _auto_augment(images, auto_augment, shape=images.shape(dtype=types.INT32))
        return images, flip, labels_out
    images = fn.resize(
        images, resize_x=crop, resize_y=crop, interp_type=types.INTERP_LINEAR, antialias=True
    )
    if auto_augment != "none":  # on the GPU, on the resized uint8 crop, as torchvision orders it
        images = _auto_augment(images, auto_augment, shape=(crop, crop))
    images = _normalize(images, crop=crop, dtype=dtype, layout=_layout(channels_last), mirror=flip)
    return images, labels_out.gpu()


def _pad_crop(images, size: int, padding: int):
    """HWC uint8 ``images`` of any size -> ``size`` x ``size``: resized to that square, then
    the ``size`` x ``size`` window starting at a random (x, y) in [-``padding``, ``padding``]^2
    (whole pixels, each value equally likely: torchvision's RandomCrop of the image padded by
    ``padding`` on each side), the part outside the image filled with black (0). On the images'
    device; the random start is drawn on the CPU (an argument input). On the CPU the resize runs
    in DALI, not in the loader's faster torch kernel (:func:`resize_and_flip`): nothing to do for
    images already of the crop size (CIFAR's), a cost for large ones."""
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
    if padding == 0:
        return images
    shifts = [float(v) for v in range(-padding, padding + 1)]
    start = fn.random.uniform(values=shifts, shape=[2], dtype=types.INT32)  # (x, y), as axis_names
    return fn.slice(images, start=start, shape=[size, size], axis_names="WH", out_of_bounds_policy="pad",
                    fill_values=augment.FILL)


@pipeline_def(enable_conditionals=False)
def val_pipeline(
    read,
    *,
    image_size: int = 224,
    val_resize: int = 256,
    device: str = "gpu",
    dtype: str = "float32",
    channels_last: bool = False,
    hw_decoder_load: float = 0.65,
    use_mmap: bool = True,
):
    """Read the samples ``read`` names, in order (as :func:`train_pipeline`); shorter side to ``val_resize``, centre crop ``image_size``
    (torchvision's Resize + CenterCrop), CHW: normalised in ``dtype`` on the GPU (HWC with
    ``channels_last``, as in :func:`train_pipeline`), uint8 on the CPU (normalised by the consumer)."""
    jpegs, labels_out = read(use_mmap)
    gpu = device == "gpu"
    images = fn.decoders.image(
        jpegs,
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        **(_mixed_decoder_hints(hw_decoder_load) if gpu else {}),
    )
    images = fn.resize(
        images, resize_shorter=val_resize, interp_type=types.INTERP_LINEAR, antialias=True
    )
    if not gpu:
        images = fn.crop_mirror_normalize(
            images, crop=(image_size, image_size), output_layout="CHW", dtype=types.UINT8
        )
        return images, labels_out
    images = _normalize(images, crop=image_size, dtype=dtype, layout=_layout(channels_last))
    return images, labels_out.gpu()


def _layout(channels_last: bool) -> str:
    return "HWC" if channels_last else "CHW"


def pipeline_seed(seed: int, epoch: int, shard_id: int, start_step: int = 0) -> int:
    """DALI's seed for one (run seed, epoch, rank, resume point): distinct streams, reproducible."""
    state = np.random.SeedSequence([seed, epoch, shard_id, start_step]).generate_state(1)[0]
    return int(state) & 0x7FFF_FFFF


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
            object.__setattr__(self, "dtype", {v: k for k, v in _DTYPES.items()}.get(self.dtype, str(self.dtype)))
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(_DTYPES)}")
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
    """Batches ``(images, labels)`` of one rank, rebuilt from :mod:`sharding` every epoch.

    What it reads: ``files`` and their ``labels`` (:class:`FileSource`), or a pack's split given
    as ``files`` (a :class:`shards.ShardSplit`; ``labels`` unused: :class:`ShardSource`).

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
        files: Sequence[str] | shards.ShardSplit,
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
        if isinstance(files, shards.ShardSplit):
            self.source: FileSource | ShardSource = ShardSource(files)
        else:
            self.source = FileSource(files, [] if labels is None else labels)
        if options.device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' but CUDA is not available here: use device='cpu'")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id} is outside [0, num_shards={num_shards})")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
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

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches()

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
        common = dict(
            batch_size=self.batch_size,
            num_threads=self.options.num_threads,
            device_id=self.options.device_id,
            seed=pipeline_seed(self.seed, self._epoch if self.train else 0, self.shard_id, start_step),
            prefetch_queue_depth=self.options.prefetch,
            device=self.options.device,
            dtype=self.options.dtype,
            channels_last=self.options.channels_last,
            hw_decoder_load=self.options.hw_decoder_load,
            use_mmap=self.options.use_mmap,
        )
        read = self.source.reading(np.asarray(ids, dtype=np.int64))
        if self.train:
            auto = self.options.auto_augment
            pipe = train_pipeline(read, crop=self.options.train_size(self._epoch), auto_augment=auto,
                                  crop_mode=self.options.crop, crop_padding=self.options.crop_padding,
                                  enable_conditionals=auto != "none", **common)
        else:
            pipe = val_pipeline(read, image_size=self.options.val_image_size,
                                val_resize=self.options.val_resize, **common)
        return pipe

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.release()  # the previous epoch's pipeline, if its iteration was abandoned
        idx, start = self._indices()
        if len(idx) == 0:  # a validation rank without images
            return
        steps, step = len(self), start
        size = self.options.train_size(self._epoch)
        erasing = self.options.random_erasing if self.train else 0.0
        if erasing:  # its own stream, seeded like the pipeline's
            rng = np.random.default_rng([self.seed, self._epoch, self.shard_id, start, 1])
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
                    # DALI was asked for batch ``step``; its reader may have failed a batch ahead of
                    # it and its decoder up to ``prefetch`` batches ahead.
                    first = (step - start) * self.batch_size
                    in_flight = idx[first : first + (self.options.prefetch + 2) * self.batch_size]
                    raise RuntimeError(self.source.error(str(err), in_flight)) from err
                step += 1
                if self.train:  # the position moves when a batch is handed out
                    self._epoch, self._step = (self._epoch + 1, 0) if step == steps else (self._epoch, step)
                batch = model_batch(
                    images, labels, dtype=_DTYPES[self.options.dtype], channels_last=self.options.channels_last,
                    device=self.options.output_device, buffers=self._buffers,
                )
                if erasing:
                    # On the finished batch, where it is handed over (the GPU for dali_gpu, the
                    # training device for dali_cpu): one masked fill of the whole batch, rather
                    # than DALI's fn.erase, whose boxes would be drawn per sample in the graph.
                    # After normalisation, as torchvision's recipe erases (value 0: the mean colour).
                    n, _, height, width = batch[0].shape
                    augment.erase(batch[0], augment.erase_boxes(rng, n, height, width, erasing))
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

    def _outputs(self, pipe, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The built pipeline's batches as torch tensors ``(images, labels)``, as DALI made them
        (normalised on the GPU, uint8 from a CPU pipeline); ``size``: a CPU training crop's."""
        if self.options.device == "cpu" and self.train:
            # Crops of different sizes, which DALI's iterator cannot stack: run the pipeline
            # directly. ``run`` keeps ``prefetch`` batches decoding in DALI's threads meanwhile.
            while True:
                crops, flips, labels = pipe.run()
                flags = np.asarray(flips.as_tensor()).reshape(-1).astype(bool).tolist()
                images = resize_and_flip(
                    [torch.from_dlpack(crops[i]) for i in range(len(crops))], flags, size=size,
                    num_threads=self.options.num_threads, out=self._buffers.take((len(crops), 3, size, size), torch.uint8),
                )
                yield images, self.source.to_labels(torch.from_numpy(np.asarray(labels.as_tensor()).copy()))
        # Its constructor already runs the pipeline.
        batches = self._iter = DALIGenericIterator(
            [pipe],
            ["images", "labels"],
            reader_name="Reader",
            auto_reset=False,  # rebuilt every epoch instead
            last_batch_policy=LastBatchPolicy.PARTIAL,  # train lists are whole batches
        )
        for out in batches:
            yield out[0]["images"], self.source.to_labels(out[0]["labels"])

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


def model_batch(
    images: torch.Tensor, labels: torch.Tensor, *, dtype: torch.dtype, channels_last: bool,
    device: torch.device | None, buffers: BufferPool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A DALI output -> the batch the model consumes, with at most one pass over the images.

    From a GPU pipeline, ``images`` are normalised already: NCHW, or NHWC with ``channels_last``,
    which becomes an NCHW *view* with channels_last strides (no copy); only bfloat16 is cast here
    (DALI has no bfloat16 output), keeping the layout. From a CPU pipeline they are uint8 NCHW:
    sent to ``device`` (``None``: handed over as they are) and normalised there in one pass,
    straight into ``dtype`` and the layout (into a released buffer of ``buffers`` when that is
    float32 on the CPU).
    """
    labels = labels.reshape(-1)
    if images.dtype == torch.uint8:
        if device is None:
            return images, labels.long()
        images, labels = _to_device(images, device), _to_device(labels, device)
        out = None
        if buffers is not None and device.type == "cpu" and dtype == torch.float32:
            out = buffers.take(tuple(images.shape), torch.float32, channels_last=channels_last)
        return normalize(images, dtype, channels_last=channels_last, out=out), labels.long()
    if channels_last:
        images = images.permute(0, 3, 1, 2)
    if images.dtype != dtype:
        images = images.to(dtype)  # preserve_format: a channels_last view stays channels_last
    return images, labels.long()


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (host memory) on ``device``, copied without making the host wait for the GPU."""
    return _pinned(tensor, device).to(device, non_blocking=True)


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` in page-locked memory when it is bound for a CUDA device.

    A "non_blocking" copy from pageable memory is synchronous: the host first waits for the GPU to
    finish everything queued on the stream, then copies, so loading the next batch would no longer
    overlap the running step. From pinned memory it is a DMA the host does not wait for. DALI's CPU
    outputs are pageable (its pipeline has no CUDA device); ``pin_memory()`` takes a block from
    torch's caching host allocator, which hands it out again only after the copies reading it
    have finished on the GPU.
    """
    if device.type == "cuda" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor

