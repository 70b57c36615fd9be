"""The torchvision backend: Pillow decoding in DataLoader workers.

The fallback where DALI is not installed, and the reference the DALI pipelines are checked
against. The sample order comes from ``sharding`` (folders) or ``shards`` (a pack) like every
other backend's. Training transforms are ``torchvision.transforms.v2`` (as torchvision's
reference recipes use them).

A pack's images are read straight from their tar at the offsets in the shard's index (DALI's
index, :mod:`data_pipelines.shards`): one ``pread`` per image, no tar library, no listing.
"""
from __future__ import annotations

import functools
import io
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import v2

from data_pipelines import IMAGENET_MEAN, IMAGENET_STD, augment, shards
from data_pipelines.resolution import ResolutionSchedule, train_size
from data_pipelines.sharding import EpochSampler, val_indices



def load_rgb(path, name: str | None = None, hint: str = "Run `imagenet-trainer check-data ROOT` to list every bad file") -> Image.Image:
    """Decode ``path`` (a file name or a binary file object, then called ``name``) to RGB,
    applying its EXIF orientation as DALI's decoder does."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported with the file
        raise RuntimeError(f"cannot decode image {name or path}: {err}. {hint}") from err


class FileImages:
    """Images as files: ``load(i)`` -> (RGB image, label)."""

    def __init__(self, files: Sequence[str], labels: Sequence[int]) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[Image.Image, int]:
        return load_rgb(self.files[index]), int(self.labels[index])


class ShardImages:
    """A pack's split: ``load(id)`` reads the image and its ``.cls`` at the offsets of the shard's
    index. Each worker process parses an index the first time it reads from that shard (a
    shard's index, not the split's: start-up reads none) and keeps its tars open."""

    def __init__(self, split: shards.ShardSplit) -> None:
        self.split = split
        self._offsets: dict[int, np.ndarray] = {}
        self._files: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.split)

    def __getstate__(self):  # to a worker process: without open files
        return {"split": self.split, "_offsets": {}, "_files": {}}

    def _entry(self, shard: int, position: int) -> np.ndarray:
        if shard not in self._offsets:
            # "jpg OFFSET SIZE KEY.jpg cls OFFSET SIZE KEY.cls" -> [[jpg off, size, cls off, size]]
            rows = [line.split() for line in self.split.index_lines(shard)]
            self._offsets[shard] = np.array([[int(r[1]), int(r[2]), int(r[5]), int(r[6])] for r in rows], np.int64)
        return self._offsets[shard][position]

    def load(self, sample: int) -> tuple[Image.Image, int]:
        shard, position = (int(v[0]) for v in self.split.locate(np.array([sample])))
        jpg_offset, jpg_size, cls_offset, cls_size = self._entry(shard, position).tolist()
        if shard not in self._files:
            self._files[shard] = open(self.split.shards[shard].tar, "rb")  # noqa: SIM115 - kept open
        fd = self._files[shard].fileno()
        name = f"{self.split.shards[shard].tar} (image {position} of its index)"
        label = os.pread(fd, cls_size, cls_offset)
        image = load_rgb(io.BytesIO(os.pread(fd, jpg_size, jpg_offset)), name=name,
                         hint=f"The shard is damaged or was not written by `imagenet-trainer pack`: "
                              f"`imagenet-trainer check-data {self.split.root}` checks every shard's sha256")
        return image, int(label)


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
    """(image tensor, label) for the images of ``images`` (:class:`FileImages`, :class:`ShardImages`)
    at ``ids`` (all, in order, when ``None``)."""

    def __init__(self, images: FileImages | ShardImages, transform, ids: Sequence[int] | None = None) -> None:
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

    def __init__(self, images: FileImages | ShardImages, make_transform: Callable[[int], Callable]) -> None:
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


def _images(files, labels) -> FileImages | ShardImages:
    return ShardImages(files) if isinstance(files, shards.ShardSplit) else FileImages(files, labels)


def build_train_loader(
    files: Sequence[str] | shards.ShardSplit,
    labels: Sequence[int] | None,
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
    (:func:`train_transform`). ``files``: a pack's split instead (``labels`` unused), read in
    :mod:`shards`'s order."""
    augment.check_crop(crop, crop_padding)
    order = functools.partial(shards.train_ids, files) if isinstance(files, shards.ShardSplit) else None
    sampler = EpochSampler(len(files), seed=seed, shard_id=shard_id, num_shards=num_shards,
                           batch_size=batch_size, resume=resume, repeats=repeats, order=order)
    make_transform = functools.partial(train_transform, auto_augment=auto_augment, random_erasing=random_erasing,
                                       crop=crop, crop_padding=crop_padding)
    return DataLoader(
        TrainImages(_images(files, labels), make_transform),
        batch_size=batch_size,
        sampler=SizedSampler(sampler, functools.partial(train_size, image_size=image_size, schedule=resolution)),
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def build_val_loader(
    files: Sequence[str] | shards.ShardSplit,
    labels: Sequence[int] | None,
    *,
    batch_size: int,
    image_size: int,
    val_resize: int,
    num_workers: int,
    shard_id: int,
    num_shards: int,
) -> DataLoader:
    mine = val_indices(len(files), shard_id=shard_id, num_shards=num_shards)
    dataset = ImageFiles(_images(files, labels), val_transform(image_size, val_resize), ids=mine)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
