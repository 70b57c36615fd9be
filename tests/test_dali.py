"""The DALI loader on the CPU, with real DALI: sharding, resume, determinism, bad files.

Each image's label is its index in the file list, so the labels a loader yields say exactly which
images it fed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines import sharding
from data_pipelines.dali import DALILoader, PipelineOptions, dali_available
from tests import photos

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")

NUM_IMAGES = 37  # uneven: leaves a remainder for every world size and batch size used here
BATCH = 3
SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """Small photo-like JPEGs (48x40)."""
    root = tmp_path_factory.mktemp("dali")
    rng = np.random.default_rng(0)
    return [str(photos.write_jpeg(root / f"{i:03d}.JPEG", rng, 48, 40, quality=90)) for i in range(NUM_IMAGES)]


def _loader(files, **kw) -> DALILoader:
    """A CPU loader over ``files``; ``kw`` sets the loader's arguments and its PipelineOptions' fields."""
    args = dict(labels=list(range(len(files))), batch_size=BATCH, seed=7)
    options = dict(image_size=SIZE, val_resize=36, device="cpu", num_threads=1)
    for key, value in kw.items():
        (options if key in PipelineOptions.__dataclass_fields__ else args)[key] = value
    return DALILoader(files, args.pop("labels"), options=PipelineOptions(**options), **args)


def _labels(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_train_shards_are_disjoint_equal_and_follow_sharding(files, world_size):
    fed = []
    for rank in range(world_size):
        loader = _loader(files, train=True, shard_id=rank, num_shards=world_size)
        batches = _labels(loader)
        assert len(batches) == len(loader) == sharding.steps_per_epoch(NUM_IMAGES, world_size, BATCH)
        assert all(len(b) == BATCH for b in batches)
        flat = [i for b in batches for i in b]
        expected = sharding.train_indices(
            NUM_IMAGES, epoch=0, seed=7, shard_id=rank, num_shards=world_size, batch_size=BATCH
        )
        assert flat == expected.tolist()
        fed.append(flat)
    assert len({len(f) for f in fed}) == 1  # equal step counts: DDP would deadlock otherwise
    everything = [i for f in fed for i in f]
    assert len(everything) == len(set(everything))  # disjoint within the epoch


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_val_shards_cover_every_image_exactly_once(files, world_size):
    seen = []
    for rank in range(world_size):
        loader = _loader(files, train=False, shard_id=rank, num_shards=world_size)
        batches = _labels(loader)
        assert len(batches) == len(loader)
        assert all(len(b) == BATCH for b in batches[:-1]) and 1 <= len(batches[-1]) <= BATCH
        flat = [i for b in batches for i in b]
        assert flat == list(sharding.val_indices(NUM_IMAGES, shard_id=rank, num_shards=world_size))
        seen += flat
    assert sorted(seen) == list(range(NUM_IMAGES))  # no padded duplicates, nothing missing


def test_val_rank_without_images_yields_nothing(files):
    loader = _loader(files[:3], train=False, shard_id=0, num_shards=4)  # 3 images on 4 ranks
    assert len(loader) == 0 and _labels(loader) == []


@pytest.mark.parametrize(
    "dtype, torch_dtype",
    [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)],
)
def test_batch_shapes_and_types(files, dtype, torch_dtype):
    for train in (True, False):
        images, labels = next(iter(_loader(files, train=train, dtype=dtype)))
        assert images.shape == (BATCH, 3, SIZE, SIZE) and images.dtype == torch_dtype
        assert images.device.type == "cpu"
        assert labels.shape == (BATCH,) and labels.dtype == torch.int64
        values = images.float()
        assert torch.isfinite(values).all()
        # normalised with ImageNet mean/std: roughly centred, within the reachable range
        assert -2.2 <= values.min() and values.max() <= 2.7 and abs(values.mean()) < 1.5


def test_reiterable_with_a_new_order_each_epoch(files):
    loader = _loader(files, train=True, shard_id=1, num_shards=2)
    epochs = []
    for epoch in range(3):
        assert loader.position() == (epoch, 0)
        batches = _labels(loader)
        assert len(batches) == len(loader)
        epochs.append([i for b in batches for i in b])
        expected = sharding.train_indices(
            NUM_IMAGES, epoch=epoch, seed=7, shard_id=1, num_shards=2, batch_size=BATCH
        )
        assert epochs[-1] == expected.tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    loader.set_epoch(1)  # replays an epoch exactly
    assert [i for b in _labels(loader) for i in b] == epochs[1]


def test_same_seed_same_sequence_different_seed_different_order(files):
    a = [(x.clone(), y.clone()) for x, y in _loader(files, train=True)]
    b = [(x.clone(), y.clone()) for x, y in _loader(files, train=True)]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = [y.tolist() for _, y in _loader(files, train=True, seed=8)]
    assert c != [y.tolist() for _, y in a]


def test_resume_feeds_exactly_the_remaining_batches(files):
    full = _labels(_loader(files, train=True, shard_id=0, num_shards=2))
    assert len(full) >= 4

    first = _loader(files, train=True, shard_id=0, num_shards=2)
    fed = []
    for _, labels in first:
        fed.append(labels.tolist())
        if len(fed) == 2:
            break  # the job is pre-empted after two steps
    assert first.position() == (0, 2)

    resumed = _loader(files, train=True, shard_id=0, num_shards=2)
    resumed.seek(0, 2)
    rest = _labels(resumed)
    assert fed + rest == full
    assert resumed.position() == (1, 0)
    next_epoch = [i for b in _labels(resumed) for i in b]
    expected = sharding.train_indices(NUM_IMAGES, epoch=1, seed=7, shard_id=0, num_shards=2, batch_size=BATCH)
    assert next_epoch == expected.tolist()


def test_state_is_the_next_epoch_after_its_last_batch(files):
    loader = _loader(files, train=True)
    for step, _ in enumerate(loader, start=1):
        if step < len(loader):
            assert loader.position() == (0, step)
    # Lightning stops after len() batches without asking for one more: the position must already
    # be the next epoch when the last batch is handed out.
    assert loader.position() == (1, 0)


def test_seek_to_the_end_of_an_epoch_is_the_next_epoch(files):
    loader = _loader(files, train=True)
    loader.seek(2, len(loader))
    assert loader.position() == (3, 0)
    with pytest.raises(ValueError, match="outside"):
        loader.seek(0, len(loader) + 1)


def test_the_loader_offers_lightning_no_state_of_its_own(files):
    """The data position of a fit is the DataModule's (batches trained); a loader state_dict would
    make Lightning save and restore a second one (batches handed out), which disagrees with it
    when the checkpoint is written at a step's start (tests/test_resume.py)."""
    from lightning_fabric.utilities.types import _Stateful  # what Lightning checks before saving a loader

    assert not isinstance(_loader(files, train=True), _Stateful)


def test_train_loader_rejects_a_shard_smaller_than_a_batch(files):
    with pytest.raises(ValueError, match="batch_size"):
        _loader(files[:5], train=True, num_shards=2, batch_size=3)


@pytest.mark.parametrize("bad", ["truncated", "text"])
def test_bad_file_stops_with_its_path(tmp_path, files, bad):
    path = tmp_path / f"{bad}.JPEG"
    if bad == "truncated":
        data = open(files[0], "rb").read()
        path.write_bytes(data[: len(data) // 2])
    else:  # DALI's own message does not name this one; the loader finds it by decoding again
        path.write_text("this is not a JPEG\n")
    listed = files[:20] + [str(path)] + files[20:]
    loader = _loader(listed, train=False)
    with pytest.raises(RuntimeError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert str(path) in message
    assert "check-data" in message
    # no other file is blamed
    assert not any(f in message for f in files)



def _lightning(files):
    """A LightningModule that records the labels it trains on, and a DataModule feeding it."""
    pl = pytest.importorskip("pytorch_lightning")

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)
            self.seen: list[list[int]] = []

        def training_step(self, batch, _):
            images, labels = batch
            self.seen.append(labels.tolist())
            return self.layer(images.mean((2, 3))).sum()

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return _loader(files, train=True, image_size=16, val_resize=16)

        def val_dataloader(self):
            return _loader(files, train=False, image_size=16, val_resize=16)

    options = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    return pl, Model, Data, options


def test_lightning_epochs_cut_short_still_follow_sharding(files):
    """With limit_train_batches an epoch ends early; Lightning's set_epoch keeps the loader on
    Lightning's epoch instead of continuing the unfinished one."""
    pl, Model, Data, options = _lightning(files)
    model = Model()
    pl.Trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1, **options).fit(model, Data())
    expected = [
        b.tolist()
        for epoch in range(3)
        for b in sharding.train_indices(
            NUM_IMAGES, epoch=epoch, seed=7, shard_id=0, num_shards=1, batch_size=BATCH
        ).reshape(-1, BATCH)[:2]
    ]
    assert model.seen == expected


def test_pipeline_options_name_a_bad_value_when_made():
    """The options are checked where they are written, before any loader or pipeline exists."""
    with pytest.raises(ValueError, match="device='tpu'"):
        PipelineOptions(device="tpu")
    with pytest.raises(ValueError, match="device_id"):
        PipelineOptions(device="gpu")
    with pytest.raises(ValueError, match="val_resize=200 is smaller than image_size=224"):
        PipelineOptions(device="cpu", val_resize=200)
    with pytest.raises(ValueError, match="dtype='int8'"):
        PipelineOptions(device="cpu", dtype="int8")
    assert PipelineOptions(device="cpu", dtype=torch.bfloat16).dtype == "bfloat16"
    assert PipelineOptions(device="cpu", output_device=None).output_device is None
    assert PipelineOptions(device="cpu", device_id=3).device_id is None  # a CPU pipeline has no device
