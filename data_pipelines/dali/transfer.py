"""DALI's outputs to the batch the model consumes: torch tensors, in the model's dtype, memory
format and device, with at most one pass over the images.

A GPU pipeline's batches are normalised by DALI already (:func:`model_batch` only views or casts
them). A CPU pipeline hands over uint8: its training crops, of different sizes, are resized and
flipped here by torch's kernel in a thread pool (:func:`resize_and_flip`), then every uint8 batch
is sent to the training device and normalised there (:func:`data_pipelines.normalize`).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .. import normalize
from ..buffers import BufferPool

try:
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except (ImportError, OSError):  # without DALI: graphs.require_dali() says so before a pipeline runs
    DALIGenericIterator = LastBatchPolicy = None

# The dtypes a loader hands its images over in, by name (PipelineOptions.dtype).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dali_batches(pipe) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A built pipeline's ``(images, labels)`` as torch tensors, on its device, batch by batch
    (DALI's iterator, whose constructor already runs the pipeline)."""
    batches = DALIGenericIterator(
        [pipe],
        ["images", "labels"],
        reader_name="Reader",
        auto_reset=False,  # rebuilt every epoch instead
        last_batch_policy=LastBatchPolicy.PARTIAL,  # train lists are whole batches
    )
    return ((out[0]["images"], out[0]["labels"]) for out in batches)


def resized_crops(outputs, *, size: int, num_threads: int, buffers: BufferPool) -> tuple[torch.Tensor, torch.Tensor]:
    """One run of a CPU training pipeline, ``(crops, flips, labels)`` (crops of different sizes,
    which DALI's iterator cannot stack), as a ``[N, 3, size, size]`` uint8 batch (in a released
    buffer of ``buffers``) and the labels output as a tensor."""
    crops, flips, labels = outputs
    flags = np.asarray(flips.as_tensor()).reshape(-1).astype(bool).tolist()
    images = resize_and_flip(
        [torch.from_dlpack(crops[i]) for i in range(len(crops))], flags, size=size,
        num_threads=num_threads, out=buffers.take((len(crops), 3, size, size), torch.uint8),
    )
    return images, torch.from_numpy(np.asarray(labels.as_tensor()).copy())


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
