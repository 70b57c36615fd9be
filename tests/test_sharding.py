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


def _pack_order(counts):
    """``train_ids`` over a pack's split of shards holding ``counts`` images (no files needed)."""
    from pathlib import Path

    from data_pipelines import shards

    root = Path("/nowhere")
    split = shards.ShardSplit(root, "train", ["a"], [
        shards.Shard(root / f"train-{i:06d}.tar", root / f"train-{i:06d}.idx", n, 0, "") for i, n in enumerate(counts)
    ])
    return split, lambda **kw: shards.train_ids(split, **kw)


@pytest.mark.parametrize("source", ["folders", "pack"])
@pytest.mark.parametrize("repeats", [2, 3])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_repeated_copies_go_to_different_ranks_from_folders_and_packs_alike(source, world, repeats):
    """Repeated augmentation, one rule for both sources (DeiT's RASampler): an image's copies are
    dealt to min(repeats, world) distinct ranks, at most one per rank when world >= repeats (so
    never two in one batch of a rank), fed in the same step or the next; every chosen image comes
    ``repeats`` times except possibly the epoch's last. A pack's rank still reads its shards in one
    go, from a stretch of the shard stream under two spans long (locality)."""
    batch, counts = 4, [10, 10, 10, 7, 10, 3, 9, 10, 10, 10, 10, 8, 10, 10, 6]  # 133 images
    n = sum(counts)
    if source == "pack":
        split, order = _pack_order(counts)
    else:
        order = lambda **kw: train_indices(n, **kw)  # noqa: E731
    steps = steps_per_epoch(n, world, batch)
    for epoch in range(2):
        kw = dict(epoch=epoch, seed=3, num_shards=world, batch_size=batch, repeats=repeats)
        ranks = [order(shard_id=r, **kw) for r in range(world)]
        assert [len(ids) for ids in ranks] == [steps * batch] * world
        for r in range(world):  # resume and determinism: the same order, fed from a later batch
            assert order(shard_id=r, start_step=2, **kw).tolist() == ranks[r][2 * batch :].tolist()
        where: dict[int, list[tuple[int, int]]] = {}  # image -> [(rank, position on it)]
        for r, ids in enumerate(ranks):
            for position, image in enumerate(ids.tolist()):
                where.setdefault(image, []).append((r, position))
        total = world * steps * batch
        assert len(where) == -(-total // repeats)
        short = [image for image, copies in where.items() if len(copies) != repeats]
        assert len(short) <= (total % repeats != 0)
        for image, copies in where.items():
            if image in short:
                continue
            on = [r for r, _ in copies]
            assert len(set(on)) == min(repeats, world), (image, copies)
            if world >= repeats:
                assert len(on) == len(set(on))  # one copy per rank: never two in one batch
            positions = [p for _, p in copies]
            assert max(positions) - min(positions) <= -(-(repeats - 1) // min(world, repeats))
            assert max(p // batch for p in positions) - min(p // batch for p in positions) <= 1
        if source == "pack":
            from data_pipelines import shards

            stream = shards.shard_stream(split, epoch=epoch, seed=3)
            at = np.argsort(stream)
            for ids in ranks:
                shard_of, _ = split.locate(ids)
                assert np.count_nonzero(np.diff(shard_of)) + 1 == len(set(shard_of.tolist())), "shards in one go"
                read = at[ids]
                assert (np.diff(read) >= 0).all() and read[-1] - read[0] < 2 * steps * batch
