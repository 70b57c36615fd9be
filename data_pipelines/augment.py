"""Training augmentations shared by the backends: the automatic augmentation policies and their
settings (one set of numbers for DALI's and torchvision's implementations), and random erasing
of a whole batch for the DALI loaders.

Where each runs: on the device that decodes. dali_gpu: DALI's ``auto_aug`` on the GPU; dali_cpu:
DALI's ``auto_aug`` on the CPU; torchvision: ``torchvision.transforms.v2`` in the DataLoader
workers. MixUp and CutMix act on the batch after the loader, for every backend
(``trainer/mixing.py``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import IMAGENET_MEAN

AUTO_AUGMENTS = ("none", "trivial_wide", "rand_augment")

# RandAugment as torchvision's recipe runs it (and its defaults): 2 operations of magnitude 9 of 31 bins.
RAND_AUGMENT_OPS = 2
RAND_AUGMENT_MAGNITUDE = 9
MAGNITUDE_BINS = 31
# The largest translation, as a fraction of the image side: torchvision's TrivialAugmentWide
# shifts by up to 32 px (at 224: 1/7), its RandAugment by up to 150/331 of the side. DALI is given
# the same fractions (its own defaults differ: all of the side for TrivialAugmentWide).
TRIVIAL_WIDE_MAX_TRANSLATE = 32 / 224
RAND_AUGMENT_MAX_TRANSLATE = 150 / 331
# The pixel value of the area a rotation, shear or translation uncovers: black, torchvision's
# default (DALI's default is 128).
FILL = 0

# Random erasing as torchvision's RandomErasing draws it (its defaults): area 2-33% of the image,
# aspect ratio 0.3-3.3 (log-uniform), up to 10 attempts to fit, filled with 0 after normalisation
# (the mean colour).
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10


def check_auto_augment(name: str) -> str:
    if name not in AUTO_AUGMENTS:
        raise ValueError(f"auto_augment={name!r}: expected one of {', '.join(AUTO_AUGMENTS)}")
    return name


def erase_boxes(rng: np.random.Generator, n: int, height: int, width: int, p: float) -> np.ndarray:
    """``[n, 4]`` int boxes (top, left, h, w) to erase, one per image; ``h = w = 0`` where an
    image is left alone (with probability ``1 - p``, or when no attempt fits, as torchvision does)."""
    boxes = np.zeros((n, 4), np.int64)
    chosen = rng.random(n) < p
    area = height * width
    log_ratio = np.log(ERASE_RATIO)
    for i in np.flatnonzero(chosen):
        for _ in range(ERASE_ATTEMPTS):
            erase_area = area * rng.uniform(*ERASE_SCALE)
            aspect = math.exp(rng.uniform(*log_ratio))
            h = int(round(math.sqrt(erase_area * aspect)))
            w = int(round(math.sqrt(erase_area / aspect)))
            if h < height and w < width:
                boxes[i] = (rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w)
                break
    return boxes


def erase(images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Fill each image's box (:func:`erase_boxes`) with the mean colour, in place: 0 in a
    normalised float batch, the mean pixel in a uint8 one. One pass over the batch on its device,
    whatever the batch size; keeps the memory format (channels_last stays)."""
    n, _, height, width = images.shape
    box = torch.from_numpy(boxes).to(images.device, non_blocking=True).view(n, 4, 1, 1)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    top, left, h, w = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    mask = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)  # [N, H, W]
    if images.dtype == torch.uint8:
        for c, mean in enumerate(IMAGENET_MEAN):
            images[:, c].masked_fill_(mask, round(mean * 255))
    else:
        images.masked_fill_(mask.unsqueeze(1), 0.0)
    return images
