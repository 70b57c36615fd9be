"""The torchvision backend: Pillow decoding in DataLoader workers.

The fallback where DALI is not installed, and the reference the DALI pipelines are checked
against. The sample order comes from ``sharding`` like every other backend's.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from data_pipelines import IMAGENET_MEAN, IMAGENET_STD
from data_pipelines.sharding import EpochSampler, val_indices



def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` to RGB, applying its EXIF orientation as DALI's decoder does."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder failure is reported with the file
        raise RuntimeError(
            f"cannot decode image {path}: {err}. Run `imagenet-trainer check-data ROOT` to list every bad file"
        ) from err


def train_transform(image_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(image_size: int, val_resize: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(val_resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageFiles(Dataset):
    """(image tensor, label) for a list of files."""

    def __init__(self, files: Sequence[str], labels: Sequence[int], transform) -> None:
        self.files = files
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.files[index])), torch.tensor(self.labels[index], dtype=torch.int64)


def build_train_loader(
    files: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int,
    image_size: int,
    num_workers: int,
    seed: int,
    shard_id: int,
    num_shards: int,
    resume: tuple[int, int] | None = None,
) -> DataLoader:
    """Training batches of rank ``shard_id``; ``resume`` = (epoch, batches of it already fed)."""
    sampler = EpochSampler(len(files), seed=seed, shard_id=shard_id, num_shards=num_shards,
                           batch_size=batch_size, resume=resume)
    return DataLoader(
        ImageFiles(files, labels, train_transform(image_size)),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def build_val_loader(
    files: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int,
    image_size: int,
    val_resize: int,
    num_workers: int,
    shard_id: int,
    num_shards: int,
) -> DataLoader:
    mine = val_indices(len(files), shard_id=shard_id, num_shards=num_shards)
    dataset = ImageFiles([files[i] for i in mine], [labels[i] for i in mine], val_transform(image_size, val_resize))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
