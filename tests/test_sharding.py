"""Which indices each rank reads: disjoint, covering, equal step counts, resumable."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.sharding import EpochSampler, steps_per_epoch, train_indices, val_indices


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [64, 67, 101])
def test_train_shards_are_disjoint_equal_and_reshuffled(world, n):
    batch = 4
    steps = steps_per_epoch(n, world, batch)
    epochs = []
    for epoch in range(2):
        shards = [train_indices(n, epoch=epoch, seed=7, shard_id=r, num_shards=world, batch_size=batch)
                  for r in range(world)]
        assert all(len(s) == steps * batch for s in shards)  # equal steps on every rank
        flat = np.concatenate(shards)
        assert len(set(flat.tolist())) == len(flat)  # disjoint
        assert n - len(flat) < world * batch  # at most a partial global batch is left out
        epochs.append(flat)
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 50, 51])
def test_val_shards_cover_every_image_exactly_once(world, n):
    # n < world too: the ranks without an image get an empty slice, nothing is padded.
    seen = [i for r in range(world) for i in val_indices(n, shard_id=r, num_shards=world)]
    assert sorted(seen) == list(range(n))


def test_resume_skips_exactly_the_fed_batches():
    full = train_indices(100, epoch=3, seed=1, shard_id=1, num_shards=2, batch_size=5)
    rest = train_indices(100, epoch=3, seed=1, shard_id=1, num_shards=2, batch_size=5, start_step=4)
    assert np.array_equal(rest, full[20:])
    # Lightning builds the loader at epoch 0, then calls set_epoch(3) when resuming.
    sampler = EpochSampler(100, seed=1, shard_id=1, num_shards=2, batch_size=5, resume=(3, 4))
    sampler.set_epoch(3)
    assert list(sampler) == full[20:].tolist()
    assert len(sampler) == len(full)  # Lightning counts the skipped batches as done
    assert list(sampler) == full.tolist()  # the skip applies once
    sampler.set_epoch(4)
    assert len(list(sampler)) == len(full)


def test_too_small_a_split_says_what_to_change():
    with pytest.raises(ValueError, match="data.batch_size"):
        steps_per_epoch(10, 4, 8)
