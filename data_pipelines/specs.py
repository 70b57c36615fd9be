"""What an ``ImageNetDataModule`` reads and how it augments, as plain frozen dataclasses: built once
from the validated config (``trainer.config.data_spec``, ``aug_spec``) or by hand in tests and
benches. The config's defaults are conf/config.yaml's; the defaults here are the DataModule's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from data_pipelines import augment
from data_pipelines.resolution import ResolutionSchedule


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """The data and its sizes. ``image_size`` is the training crop, or ``resolution`` gives it per
    epoch (progressive resizing, for every backend); validation resizes to ``val_resize`` and
    centre-crops ``val_image_size`` (None: ``image_size``). ``num_classes``: the synthetic
    backend's class count (None: 1000)."""

    root: Optional[str]  # a tree or a pack; None for backend=synthetic
    backend: str  # auto | dali_gpu | dali_cpu | torchvision | synthetic
    batch_size: int  # per device
    image_size: int
    val_resize: int
    num_workers: int  # DataLoader workers, or DALI threads
    seed: int
    val_image_size: Optional[int] = None
    resolution: Optional[ResolutionSchedule] = None
    filelist_cache: bool = True
    stage_to: Optional[str] = None
    synthetic_size: int = 1281167
    num_classes: Optional[int] = None

    @property
    def val_crop(self) -> int:
        """The validation centre crop."""
        return self.val_image_size or self.image_size


@dataclass(frozen=True, kw_only=True)
class AugSpec:
    """Training augmentation, run where the backend decodes: ``crop`` (one of ``augment.CROPS``;
    ``crop_padding``: pad_crop's px on each side), ``auto_augment`` (one of
    ``augment.AUTO_AUGMENTS``), ``random_erasing`` (a probability per image), ``repeated_augment``
    (each chosen image fed that many times per epoch: ``sharding.train_indices``)."""

    auto_augment: str = "none"
    random_erasing: float = 0.0
    repeated_augment: int = 1
    crop: str = "rrc"
    crop_padding: int = augment.CROP_PADDING

    def __post_init__(self) -> None:
        augment.check_auto_augment(self.auto_augment)
        augment.check_crop(self.crop, self.crop_padding)

    def per_image(self) -> dict:
        """The keywords of the per-image augmentation, as both loaders (torchvision's
        ``build_train_loader`` and DALI's ``PipelineOptions``) name them."""
        return dict(auto_augment=self.auto_augment, random_erasing=self.random_erasing, crop=self.crop,
                    crop_padding=self.crop_padding)
