"""Random tensors in place of images, to time the model and the training loop alone."""
from __future__ import annotations

import torch


class SyntheticLoader:
    """``num_batches`` batches of one fixed random batch (generated once: no data cost)."""

    def __init__(
        self, *, num_batches: int, batch_size: int, image_size: int, num_classes: int, seed: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, channels_last: bool = False,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        # Made on the training device once, in the dtype and memory format the model consumes (as
        # the DALI loaders give them): a copy of the batch every step would time the copy, not the model.
        layout = torch.channels_last if channels_last else torch.contiguous_format
        images = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
        self.images = images.to(device, dtype, memory_format=layout)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen, dtype=torch.int64).to(device)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            yield self.images, self.labels
