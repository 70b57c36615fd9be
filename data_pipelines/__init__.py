"""Data pipelines for imagenet-trainer: tree layout, DALI, torchvision, synthetic data."""
from __future__ import annotations

import functools

import torch

# ImageNet's per-channel mean and std (RGB, of pixel values in [0, 1]): every backend normalises
# with these, and exported models record them as their preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(
    images: torch.Tensor, dtype: torch.dtype = torch.float32, *, channels_last: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 NCHW pixels -> ``(x / 255 - mean) / std`` in ``dtype``, on ``images``' device, in the
    channels_last memory format when asked (written that way, not copied into it afterwards).

    One multiply and one add into a float32 tensor (the scale and offset fold 255, mean and std):
    ``out`` when given (float32, the shape of ``images``, in the asked layout), else a fresh one;
    half-precision outputs are cast from it, as DALI's normaliser does.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    scale, offset = _scale_offset(images.device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=layout)
    elif out.dtype != torch.float32 or out.shape != images.shape or not out.is_contiguous(memory_format=layout):
        raise ValueError(f"out must be float32 {tuple(images.shape)} in {layout}, got {out.dtype} {tuple(out.shape)}")
    torch.mul(images, scale, out=out)
    out.add_(offset)
    return out if dtype == torch.float32 else out.to(dtype)  # preserve_format: keeps the layout


@functools.lru_cache(maxsize=None)
def _scale_offset(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, 1, 1] factors with ``x * scale + offset == (x / 255 - mean) / std``, made once per
    device: building them per batch would copy to the GPU, and wait for it, at every step."""
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255
    scale = (1 / std).view(1, 3, 1, 1)
    offset = (-torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255 / std).view(1, 3, 1, 1)
    return scale.float().to(device), offset.float().to(device)
