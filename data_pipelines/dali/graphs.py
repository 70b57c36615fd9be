"""The DALI pipeline graphs: what each pipeline reads, decodes, crops, augments and normalises.

Two graphs, :func:`train_pipeline` and :func:`val_pipeline`, each reading the samples a source's
DALI reader names (:meth:`data_pipelines.sources.DaliReader.read`: the file reader for a tree,
the webdataset reader for a pack), on the GPU (nvJPEG, the ``mixed`` decoder) or on the CPU
(libjpeg-turbo). Also where DALI is imported: this package imports without it, and
:func:`require_dali` says how to install it when a pipeline is asked for.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .. import IMAGENET_MEAN, IMAGENET_STD, augment

# nvJPEG buffer sizes that fit the largest ImageNet image, so that the mixed decoder never
# reallocates mid-training (NVIDIA's ResNet-50 reference uses the same values).
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_PREALLOCATE_WIDTH_HINT = 5980
_PREALLOCATE_HEIGHT_HINT = 6430

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

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


def pipeline_seed(seed: int, epoch: int, shard_id: int, start_step: int = 0) -> int:
    """DALI's seed for one (run seed, epoch, rank, resume point): distinct streams, reproducible."""
    state = np.random.SeedSequence([seed, epoch, shard_id, start_step]).generate_state(1)[0]
    return int(state) & 0x7FFF_FFFF


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
    ``(encoded, labels)`` nodes: :meth:`data_pipelines.sources.DaliReader.read`); the training
    crop ``crop_mode`` (:data:`augment.CROPS`) to ``crop`` x ``crop``: ``rrc``, a random-resized
    crop (area [0.08, 1], aspect [3/4, 4/3]) decoded as a region of interest and resized;
    ``pad_crop``, the whole image decoded, resized to ``crop`` x ``crop``, and a ``crop`` x
    ``crop`` window shifted by a random whole number of pixels in [-``crop_padding``,
    ``crop_padding``] along each axis, the uncovered part black (a slice that pads: torchvision's
    Pad + RandomCrop in one operator); then a random flip. ``auto_augment`` (not "none"): DALI's
    TrivialAugmentWide or RandAugment on the uint8 crop, on the pipeline's device (call with
    ``enable_conditionals=True`` then).

    ``device="gpu"``: decoded by nvJPEG (``mixed``), resized, flipped and normalised on the GPU:
    CHW in ``dtype`` (HWC with ``channels_last``: the loader views it as a channels_last NCHW
    tensor, so the model gets its memory layout without a copy); outputs ``(images, labels)``.
    ``device="cpu"``: decoded by libjpeg-turbo; outputs ``(crops, flips, labels)``, the crops
    HWC uint8 at their decoded sizes (pad_crop's: ``crop`` x ``crop`` already; ``dtype`` is not
    used). The loader resizes and flips them (:func:`transfer.resize_and_flip`) while DALI
    decodes the next batch, and hands over **uint8** CHW: the consumer normalises on its device
    (:func:`data_pipelines.normalize`), which moves 4x fewer bytes and keeps the normalisation
    off the CPU when training runs on a GPU.

    Pipeline arguments (``batch_size``, ``num_threads``, ``device_id``, ``seed``,
    ``prefetch_queue_depth``) are given at call time, as for any ``@pipeline_def``.
    """
    jpegs, labels_out = read(use_mmap)
    gpu = device == "gpu"
    augment.check_crop(crop_mode, crop_padding)
    decoding = _decoding(gpu, hw_decoder_load)
    # The operators are made in the same order whatever the branch: DALI seeds each random
    # operator from the pipeline's seed and its place in the graph.
    if crop_mode == "pad_crop":
        images, flip = _padded_crops(jpegs, decoding, crop, crop_padding, auto_augment)
    else:
        images, flip = _random_resized_crops(jpegs, decoding, crop, auto_augment, gpu)
    if not gpu:  # the crops, their flips and labels: the loader resizes (resize_and_flip) and flips
        return images, flip, labels_out
    images = _normalize(images, crop=crop, dtype=dtype, layout=_layout(channels_last), mirror=flip)
    return images, labels_out.gpu()


def _padded_crops(jpegs, decoding: dict, crop: int, padding: int, auto_augment: str):
    """pad_crop: the decoded image resized and cut (:func:`_pad_crop`), its flip drawn, then the
    automatic augmentation on the finished crop, as torchvision orders it. ``crop`` x ``crop``
    already on the CPU: the loader's resize keeps them as they are, and flips."""
    images = _pad_crop(fn.decoders.image(jpegs, **decoding), crop, padding)
    flip = fn.random.coin_flip(probability=0.5)
    if auto_augment != "none":
        images = _auto_augment(images, auto_augment, shape=(crop, crop))
    return images, flip


def _random_resized_crops(jpegs, decoding: dict, crop: int, auto_augment: str, gpu: bool):
    """rrc: a random region decoded and its flip drawn; on the GPU resized to ``crop`` here, on the
    CPU by the loader."""
    images = fn.decoders.image_random_crop(
        jpegs,
        random_area=list(augment.RRC_SCALE),
        random_aspect_ratio=list(augment.RRC_RATIO),
        num_attempts=100,
        **decoding,
    )
    flip = fn.random.coin_flip(probability=0.5)
    if not gpu:
        if auto_augment != "none":
            # Augmented at the crop's own size, before the loader's resize: the auto-augment
            # operators take crops of any size (translations as a fraction of each crop's side,
            # rotations and shears scale-free, colour operations per pixel), so the loader's fast
            # resize stays outside DALI. Against torchvision's order (resize, then augment) only
            # rounding differs, and the 3x3 sharpness kernel acts at the crop's scale.
            images = _auto_augment(images, auto_augment, shape=images.shape(dtype=types.INT32))
        return images, flip
    images = fn.resize(
        images, resize_x=crop, resize_y=crop, interp_type=types.INTERP_LINEAR, antialias=True
    )
    if auto_augment != "none":  # on the GPU, on the resized uint8 crop, as torchvision orders it
        images = _auto_augment(images, auto_augment, shape=(crop, crop))
    return images, flip


def _pad_crop(images, size: int, padding: int):
    """HWC uint8 ``images`` of any size -> ``size`` x ``size``: resized to that square, then
    the ``size`` x ``size`` window starting at a random (x, y) in [-``padding``, ``padding``]^2
    (whole pixels, each value equally likely: torchvision's RandomCrop of the image padded by
    ``padding`` on each side), the part outside the image filled with black (0). On the images'
    device; the random start is drawn on the CPU (an argument input). On the CPU the resize runs
    in DALI, not in the loader's faster torch kernel (:func:`transfer.resize_and_flip`): nothing
    to do for images already of the crop size (CIFAR's), a cost for large ones."""
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
    if padding == 0:
        return images
    shifts = [float(v) for v in range(-padding, padding + 1)]
    start = fn.random.uniform(values=shifts, shape=[2], dtype=types.INT32)  # (x, y), as axis_names
    return fn.slice(images, start=start, shape=[size, size], axis_names="WH", out_of_bounds_policy="pad",
                    fill_values=augment.FILL)


def _auto_augment(images, name: str, shape):
    """DALI's own automatic augmentation ``name`` (:data:`augment.AUTO_AUGMENTS`) of HWC uint8
    ``images`` on their device, with torchvision's settings (``data_pipelines/augment.py``).
    ``shape``: the images' (H, W), a DataNode for crops of different sizes: translations are a
    fraction of each image's side. It picks operations per sample with ``if`` on DataNodes, so the
    pipeline must be defined with ``enable_conditionals=True`` (``DALILoader.pipeline`` does)."""
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
    """Read the samples ``read`` names, in order (as :func:`train_pipeline`); shorter side to
    ``val_resize``, centre crop ``image_size`` (torchvision's Resize + CenterCrop), CHW: normalised
    in ``dtype`` on the GPU (HWC with ``channels_last``, as in :func:`train_pipeline`), uint8 on
    the CPU (normalised by the consumer)."""
    jpegs, labels_out = read(use_mmap)
    gpu = device == "gpu"
    images = fn.decoders.image(jpegs, **_decoding(gpu, hw_decoder_load))
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


def _decoding(gpu: bool, hw_decoder_load: float) -> dict[str, Any]:
    """The decoder's arguments: nvJPEG (``mixed``) with its buffers preallocated on the GPU,
    libjpeg-turbo on the CPU; CMYK, grayscale and PNG all become 3-channel RGB."""
    return dict(
        device="mixed" if gpu else "cpu",
        output_type=types.RGB,
        **(_mixed_decoder_hints(hw_decoder_load) if gpu else {}),
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


def _layout(channels_last: bool) -> str:
    return "HWC" if channels_last else "CHW"
