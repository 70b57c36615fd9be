"""Which images each rank reads, in which order: one definition for every backend.

Every backend (DALI on the GPU or CPU, torchvision) feeds the indices these functions return, so
that the sample sequence is a function of (seed, epoch, rank, world size) alone:

* training: a fresh permutation of the whole split each epoch, dealt round-robin to the ranks and
  cut to the same number of full batches on every rank (unequal step counts deadlock DDP); the
  fewer than ``num_shards * batch_size`` images left over differ from epoch to epoch;
* validation: contiguous, disjoint slices that together hold every image exactly once (no padded
  duplicates, unlike ``DistributedSampler``), so top-1 is exact under any world size;
* resuming mid-epoch: ``start_step`` skips exactly the batches already fed;
* repeated augmentation (``repeats`` > 1; DeiT's RASampler, torchvision recipe's ``--ra-sampler``):
  fewer distinct images per epoch, each fed ``repeats`` times (with different random
  augmentations, as every backend draws them per sample), while the epoch keeps its length. One
  rule for folders and packs, :func:`deal_repeated`: an image's copies go to different ranks.
"""
from __future__ import annotations

import weakref

import numpy as np


def steps_per_epoch(num_images: int, num_shards: int, batch_size: int) -> int:
    """Training steps every rank runs in one epoch."""
    steps = num_images // (num_shards * batch_size)
    if steps == 0:
        raise ValueError(
            f"the training split has {num_images} images, fewer than one batch per rank "
            f"({num_shards} rank(s) x data.batch_size={batch_size}); lower data.batch_size"
        )
    return steps


def train_indices(
    num_images: int,
    *,
    epoch: int,
    seed: int,
    shard_id: int,
    num_shards: int,
    batch_size: int,
    start_step: int = 0,
    repeats: int = 1,
) -> np.ndarray:
    """Indices rank ``shard_id`` feeds in ``epoch``, from batch ``start_step`` on: a seeded
    permutation dealt round-robin; ``repeats`` > 1: the permutation's first images, each fed
    ``repeats`` times on different ranks (:func:`deal_repeated`). Ranks get the same number of
    full batches."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} is outside [0, num_shards={num_shards})")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be at least 1 (1: no repeated augmentation)")
    steps = steps_per_epoch(num_images, num_shards, batch_size)
    perm = np.random.default_rng([seed, epoch]).permutation(num_images)
    if repeats > 1:
        mine = deal_repeated(perm, repeats=repeats, shard_id=shard_id, num_shards=num_shards,
                             span=steps * batch_size)
    else:
        mine = perm[shard_id::num_shards][: steps * batch_size]
    return mine[start_step * batch_size :]


def deal_repeated(stream: np.ndarray, *, repeats: int, shard_id: int, num_shards: int, span: int) -> np.ndarray:
    """The ``span`` samples rank ``shard_id`` feeds when the epoch's ``num_shards * span`` samples
    are the first ``ceil(num_shards * span / repeats)`` images of ``stream``, each ``repeats`` times.

    The rule (DeiT's RASampler, kept local): each image is written ``repeats`` times in a row; the
    ranks form ``max(1, num_shards // repeats)`` groups of consecutive ranks, as equal as possible
    (so each has at least ``repeats`` ranks when there are that many); each group takes the next
    ``group size * span`` samples of that repeated stream and deals them round-robin over its
    ranks. So an image's copies go to ``min(repeats, num_shards)`` distinct ranks, at most one per
    rank when ``num_shards >= repeats``, in the same step or the next (with fewer ranks than
    copies, a rank's copies are next to each other, as on one GPU in DeiT); every chosen image
    comes exactly ``repeats`` times except the last when ``repeats`` does not divide the epoch.
    One group is DeiT's dealing exactly. Several keep a rank's samples within a stretch of
    ``stream`` under ``2 * span`` images long, read in ``stream``'s order: a pack's rank reads
    about as few shards as without repetition, each in one go (one group would send every rank to
    the shards of all the epoch's images, ``num_shards / repeats`` times as many).
    ``repeats`` = 1: contiguous spans of ``stream``, rank by rank.
    """
    groups = max(1, num_shards // repeats)
    bounds = [num_shards * g // groups for g in range(groups + 1)]
    group = int(np.searchsorted(bounds, shard_id, side="right")) - 1
    first, size = bounds[group], bounds[group + 1] - bounds[group]
    # Positions in the repeated stream (sample p is image p // repeats) this rank is dealt.
    positions = first * span + (shard_id - first) + size * np.arange(span, dtype=np.int64)
    return stream[positions // repeats]


def resume_point(epoch: int, batches_done: int, steps: int) -> tuple[int, int]:
    """Where a run resumed after ``batches_done`` of the ``steps`` training batches of ``epoch``
    continues: (epoch, its first batch to feed). After the epoch's last batch, that is the next
    epoch's start. An empty remainder of the old epoch would make Lightning, which looks at the
    loader before it restores its own counters, skip the next epoch altogether."""
    if not 0 <= batches_done <= steps:
        raise ValueError(f"resume position batches_done={batches_done} is outside [0, {steps}] batches per epoch")
    return (epoch + 1, 0) if batches_done == steps else (epoch, batches_done)


def val_indices(num_images: int, *, shard_id: int, num_shards: int) -> range:
    """A contiguous slice; slices of all ranks are disjoint and cover every image once."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id={shard_id} is outside [0, num_shards={num_shards})")
    start = num_images * shard_id // num_shards
    stop = num_images * (shard_id + 1) // num_shards
    return range(start, stop)


class EpochSampler:
    """This rank's training indices for the current epoch, as a DataLoader sampler.

    Lightning calls ``set_epoch`` before each epoch (it looks for ``loader.sampler.set_epoch``).
    ``resume`` = (epoch, batches already fed in it), from a checkpoint: when that epoch comes,
    iteration starts after those batches, so a resumed epoch feeds only what the interrupted one
    had not fed. ``len()`` stays the full epoch, as Lightning counts the skipped batches as done.
    """

    def __init__(
        self,
        num_images: int,
        *,
        seed: int,
        shard_id: int,
        num_shards: int,
        batch_size: int,
        resume: tuple[int, int] | None = None,
        repeats: int = 1,
        order=None,
    ) -> None:
        self.num_images = num_images
        # ``order(**kwargs of train_indices but num_images)``: another order of the same contract
        # (a pack's, ``shards.train_ids``); default :func:`train_indices` over ``num_images``.
        self.order = order
        self.repeats = repeats
        self.seed = seed
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.batch_size = batch_size
        self.steps = steps_per_epoch(num_images, num_shards, batch_size)
        self.resume = resume_point(*resume, self.steps) if resume is not None else None
        self.epoch = 0
        self.set_epoch(self.resume[0] if self.resume else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_step = self.resume[1] if self.resume and self.resume[0] == epoch else 0

    def indices(self) -> np.ndarray:
        order = self.order or (lambda **kw: train_indices(self.num_images, **kw))
        return order(
            epoch=self.epoch,
            seed=self.seed,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            batch_size=self.batch_size,
            start_step=self.start_step,
            repeats=self.repeats,
        )

    def __iter__(self):
        indices = self.indices()
        self.resume, self.start_step = None, 0  # the skip applies once; a later pass is whole
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.steps * self.batch_size


class EpochSetter:
    """The part of a sampler Lightning uses, ``set_epoch``, for a loader that orders its own samples
    (the DALI and synthetic loaders): Lightning calls ``loader.sampler.set_epoch(epoch)`` at every
    epoch start. A weak reference: the loader owns this object, not the other way round."""

    def __init__(self, loader) -> None:
        self._loader = weakref.ref(loader)

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)
