"""Training augmentations shared by the backends: the training crop (random-resized, or the
CIFAR pad-and-crop), the automatic augmentation policies and their settings (one set of numbers
for DALI's and torchvision's implementations), and random erasing of a whole batch for the DALI
loaders.

Where each runs: on the device that decodes. dali_gpu: DALI's ``auto_aug`` on the GPU; dali_cpu:
DALI's ``auto_aug`` on the CPU; torchvision: ``torchvision.transforms.v2`` in the DataLoader
workers. MixUp and CutMix act on the batch after the loader, for every backend
(``trainer/recipe/mixing.py``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import IMAGENET_MEAN

AUTO_AUGMENTS = ("none", "trivial_wide", "rand_augment")

# The training crop (``aug.crop``), the same on every backend:
#   rrc: random-resized crop, area [0.08, 1] of the image, aspect [3/4, 4/3], resized to the crop
#        size (Inception's, the ImageNet recipes'); then a random horizontal flip.
#   pad_crop: the CIFAR-10 augmentation of He et al. 2015 (section 4.2): the whole image resized
#        to the crop size (a no-op for 32x32 CIFAR images at 32), CROP_PADDING zero (black) pixels
#        added on each side, a random crop of the crop size (a shift of at most the padding in
#        each direction), then a random horizontal flip.
CROPS = ("rrc", "pad_crop")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
CROP_PADDING = 4  # the paper's 4 px on each side of a 32 px image

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


def check_crop(name: str, padding: int = CROP_PADDING) -> str:
    """``name`` if it is one of :data:`CROPS` and ``padding`` (px added on each side by pad_crop)
    is a whole number of pixels, 0 or more; else a ValueError naming the argument."""
    if name not in CROPS:
        raise ValueError(f"crop={name!r}: expected one of {', '.join(CROPS)}")
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"crop_padding={padding!r}: a number of pixels, 0 or more")
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
