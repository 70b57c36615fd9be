"""Random tensors in place of images, to time the model and the training loop alone."""
from __future__ import annotations


import torch

from data_pipelines import sharding
from data_pipelines.resolution import ResolutionSchedule, train_size


class SyntheticLoader:
    """``num_batches`` batches of one fixed random batch (generated once: no data cost).

    ``resolution``: the image size follows it per epoch (progressive resizing): the batch is made
    again when the epoch's size differs. Lightning tells the epoch through ``sampler.set_epoch``,
    as for a DataLoader's sampler.
    """

    def __init__(
        self, *, num_batches: int, batch_size: int, image_size: int, num_classes: int, seed: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, channels_last: bool = False,
        resolution: ResolutionSchedule | None = None,
    ) -> None:
        self.batch_size, self.image_size, self.num_classes, self.seed = batch_size, image_size, num_classes, seed
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.resolution = resolution
        self.num_batches = num_batches
        self.epoch = 0
        self.sampler = sharding.EpochSetter(self)
        self.batch_sampler = None  # read beside ``sampler`` by Lightning's shuffle check
        self._make(train_size(0, image_size, resolution))

    def _make(self, size: int) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        # Made on the training device once, in the dtype and memory format the model consumes (as
        # the DALI loaders give them): a copy of the batch every step would time the copy, not the model.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        images = torch.randn(self.batch_size, 3, size, size, generator=gen)
        self.images = images.to(self.device, self.dtype, memory_format=layout)
        self.labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen,
                                    dtype=torch.int64).to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        size = train_size(epoch, self.image_size, self.resolution)
        if size != self.images.shape[-1]:
            self._make(size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            yield self.images, self.labels

