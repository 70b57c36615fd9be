"""The torchvision backend: Pillow decoding in DataLoader workers.

The fallback where DALI is not installed, and the reference the DALI pipelines are checked
against. What it reads is a source (:mod:`data_pipelines.sources`: a folder tree's split or a
pack's, whose images are read straight from their tar at the offsets of the shard's index): its
sample order, like every other backend's, and each image (``Source.load``), in the DataLoader's
workers. Training transforms are ``torchvision.transforms.v2`` (as torchvision's reference recipes
use them).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import v2

from data_pipelines import IMAGENET_MEAN, IMAGENET_STD, augment
from data_pipelines.resolution import ResolutionSchedule, train_size
from data_pipelines.sharding import EpochSampler
from data_pipelines.sources import Source, as_source, load_rgb  # noqa: F401 - load_rgb: the backend's decode


def train_transform(image_size: int, auto_augment: str = "none", random_erasing: float = 0.0, *,
                    crop: str = "rrc", crop_padding: int = augment.CROP_PADDING) -> v2.Compose:
    """The training crop ``crop`` (:data:`augment.CROPS`) to ``image_size`` and a random flip:
    ``rrc``, a random-resized crop (area [0.08, 1], aspect [3/4, 4/3]); ``pad_crop``, the image
    resized to ``image_size`` square, ``crop_padding`` black pixels added on each side and a
    random ``image_size`` crop of that (He et al.'s CIFAR-10 augmentation). Then (as
    torchvision's ``ClassificationPresetTrain``) the automatic augmentation on the PIL image,
    normalisation, and random erasing with probability ``random_erasing``."""
    if augment.check_crop(crop, crop_padding) == "pad_crop":
        steps = [
            v2.Resize((image_size, image_size), antialias=True),
            v2.RandomCrop(image_size, padding=crop_padding, fill=0, padding_mode="constant"),
        ]
    else:
        steps = [v2.RandomResizedCrop(image_size, scale=augment.RRC_SCALE, ratio=augment.RRC_RATIO, antialias=True)]
    steps.append(v2.RandomHorizontalFlip())
    bilinear = v2.InterpolationMode.BILINEAR  # the reference recipe's; v2's default is nearest
    if augment.check_auto_augment(auto_augment) == "trivial_wide":
        steps.append(v2.TrivialAugmentWide(num_magnitude_bins=augment.MAGNITUDE_BINS, interpolation=bilinear,
                                           fill=augment.FILL))
    elif auto_augment == "rand_augment":
        steps.append(v2.RandAugment(num_ops=augment.RAND_AUGMENT_OPS, magnitude=augment.RAND_AUGMENT_MAGNITUDE,
                                    num_magnitude_bins=augment.MAGNITUDE_BINS, interpolation=bilinear,
                                    fill=augment.FILL))
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, scale=augment.ERASE_SCALE, ratio=augment.ERASE_RATIO, value=0))
    return v2.Compose(steps)


def val_transform(image_size: int, val_resize: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(val_resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageFiles(Dataset):
    """(image tensor, label) for the images of the source ``images`` (``Source.load``) at ``ids``
    (all, in order, when ``None``)."""

    def __init__(self, images: Source, transform, ids: Sequence[int] | None = None) -> None:
        self.images = images
        self.ids = ids
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images) if self.ids is None else len(self.ids)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return self.images.load(index if self.ids is None else int(self.ids[index]))

    def __getitem__(self, index: int):
        image, label = self._load(index)
        return self.transform(image), torch.tensor(label, dtype=torch.int64)


class TrainImages(ImageFiles):
    """(image tensor, label) for items ``(index, size)``: the sampler gives each sample the crop
    size of its epoch (:class:`SizedSampler`), since a DataLoader's persistent worker processes
    hold copies of the dataset made when they started, which a change in the main process would
    not reach. ``make_transform(size)`` builds the transform for a size (kept per size)."""

    def __init__(self, images: Source, make_transform: Callable[[int], Callable]) -> None:
        super().__init__(images, transform=None)
        self.make_transform = make_transform
        self._transforms: dict[int, Callable] = {}

    def __getitem__(self, item: tuple[int, int]):
        index, size = item
        if size not in self._transforms:
            self._transforms[size] = self.make_transform(size)
        image, label = self._load(index)
        return self._transforms[size](image), torch.tensor(label, dtype=torch.int64)


class SizedSampler:
    """An :class:`EpochSampler`'s indices, each paired with its epoch's training crop size
    (``size_at(epoch)``); ``set_epoch`` (which Lightning calls) and ``len`` are the sampler's."""

    def __init__(self, sampler: EpochSampler, size_at: Callable[[int], int]) -> None:
        self.sampler = sampler
        self.size_at = size_at

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self):
        size = self.size_at(self.sampler.epoch)
        return ((index, size) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def build_train_loader(
    source: Source | Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    batch_size: int,
    image_size: int,
    num_workers: int,
    seed: int,
    shard_id: int,
    num_shards: int,
    resume: tuple[int, int] | None = None,
    resolution: ResolutionSchedule | None = None,
    auto_augment: str = "none",
    random_erasing: float = 0.0,
    repeats: int = 1,
    crop: str = "rrc",
    crop_padding: int = augment.CROP_PADDING,
) -> DataLoader:
    """Training batches of rank ``shard_id``; ``resume`` = (epoch, batches of it already fed).
    ``resolution``: the crop size per epoch (else ``image_size``); ``repeats``: repeated
    augmentation (``sharding.train_indices``); ``crop``, ``crop_padding``: the training crop
    (:func:`train_transform`). ``source``: what it reads, in the source's order (image files,
    with their ``labels``, for short: :func:`sources.as_source`)."""
    source = as_source(source, labels)
    augment.check_crop(crop, crop_padding)
    sampler = EpochSampler(len(source), seed=seed, shard_id=shard_id, num_shards=num_shards,
                           batch_size=batch_size, resume=resume, repeats=repeats, order=source.train_ids)
    make_transform = functools.partial(train_transform, auto_augment=auto_augment, random_erasing=random_erasing,
                                       crop=crop, crop_padding=crop_padding)
    return DataLoader(
        TrainImages(source, make_transform),
        batch_size=batch_size,
        sampler=SizedSampler(sampler, functools.partial(train_size, image_size=image_size, schedule=resolution)),
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def build_val_loader(
    source: Source | Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    batch_size: int,
    image_size: int,
    val_resize: int,
    num_workers: int,
    shard_id: int,
    num_shards: int,
) -> DataLoader:
    """This rank's validation slice (``Source.val_ids``), whole, in order; ``source`` as for
    :func:`build_train_loader`."""
    source = as_source(source, labels)
    mine = source.val_ids(shard_id=shard_id, num_shards=num_shards)
    dataset = ImageFiles(source, val_transform(image_size, val_resize), ids=mine)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
