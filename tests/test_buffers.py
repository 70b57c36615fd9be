"""Reused host batches (data_pipelines/buffers.py): memory the consumer still holds, through the
batch or any view of it, is never written again; released memory is."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines import dali
from data_pipelines.buffers import BufferPool
from tests import photos
from tests.conftest import skip_without_dali

SHAPE = (4, 3, 8, 8)


def test_a_held_batch_is_never_handed_out_again_and_a_released_one_is():
    pool = BufferPool()
    first = pool.take(SHAPE, torch.float32)
    second = pool.take(SHAPE, torch.float32)
    assert first.data_ptr() != second.data_ptr()
    address = first.data_ptr()
    del first
    assert pool.take(SHAPE, torch.float32).data_ptr() == address


def test_a_view_of_a_released_batch_keeps_its_memory_busy():
    pool = BufferPool()
    batch = pool.take(SHAPE, torch.float32)
    row = batch[1]
    address = batch.data_ptr()
    del batch
    again = pool.take(SHAPE, torch.float32)
    assert again.data_ptr() != address
    del row, again
    assert pool.take(SHAPE, torch.float32).data_ptr() == address


def test_shape_dtype_and_layout_must_match():
    pool = BufferPool()
    address = pool.take(SHAPE, torch.float32).data_ptr()
    assert pool.take(SHAPE, torch.uint8).data_ptr() != address
    last = pool.take(SHAPE, torch.float32, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and last.data_ptr() != address
    assert pool.take((2, 3, 8, 8), torch.float32).data_ptr() != address


@pytest.mark.parametrize("output_device", ["cpu", None])
def test_kept_batches_and_views_survive_the_batches_after_them(tmp_path, output_device):
    """Some batches are kept whole, some only through a view, the rest dropped, as a consumer
    might; every kept pixel must equal the same epoch fed again with nothing reused."""
    skip_without_dali()
    rng = np.random.default_rng(0)
    files = [str(photos.write_jpeg(tmp_path / f"{i}.JPEG", rng, 64, 48)) for i in range(48)]
    options = dali.PipelineOptions(image_size=32, device="cpu", num_threads=2, output_device=output_device)

    def loader():
        return dali.DALILoader(files, [0] * len(files), train=True, batch_size=4, seed=1, options=options)

    kept, addresses = {}, set()
    for step, (images, _) in enumerate(loader()):
        addresses.add(images.data_ptr())
        if step % 3 == 0:
            kept[step] = images
        elif step % 3 == 1:
            kept[step] = images[1:3]  # only a view survives
        # step % 3 == 2: dropped, its memory free for the next batches
    assert len(addresses) < 12, "no memory was reused: this test would prove nothing"
    reference = [images.clone() for images, _ in loader()]
    for step, images in kept.items():
        want = reference[step] if step % 3 == 0 else reference[step][1:3]
        assert torch.equal(images, want), f"batch {step} was overwritten"
