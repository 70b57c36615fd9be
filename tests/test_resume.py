"""Interrupted and resumed training feeds exactly the images an uninterrupted run feeds, on every
backend, whether the checkpoint was written at a step's start (RequeueOnSignal, on SIGUSR1/SIGTERM)
or at its end (Lightning's ModelCheckpoint, e.g. a mid-epoch last.ckpt)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from tests import photos
from tests.conftest import Interrupt, fit_until_interrupted, pack_with_cli, skip_without_dali

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory):
    """36 classes of one train image each: a batch's labels name exactly the images in it."""
    root = tmp_path_factory.mktemp("ids")
    for split, seed in (("train", 0), ("val", 1)):
        photos.write_tree(root, split, classes=36, per_class=1, sizes=(32, 32), seed=seed)
    return root


@pytest.fixture(scope="module")
def one_image_per_class_packed(one_image_per_class, tmp_path_factory):
    """The same 36 images packed into tar shards of about 8 KB (`imagenet-trainer pack`)."""
    return pack_with_cli(one_image_per_class, tmp_path_factory.mktemp("ids_pack") / "pack", "8KB")


class Record(pl.Callback):
    """Records the labels (here: the sample ids) of every batch trained; with ``stop_at`` = (epoch,
    batch), saves a checkpoint there and stops: at that batch's start (before it is trained, as
    trainer/cluster/preemption.py does) or at its end (after, as ModelCheckpoint does)."""

    def __init__(self, stop_at=None, ckpt=None, where="start"):
        self.seen, self.stop_at, self.ckpt, self.where = [], stop_at, ckpt, where

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.where == "start" and (trainer.current_epoch, batch_idx) == self.stop_at:
            trainer.save_checkpoint(self.ckpt)  # what the SLURM USR1 handler does, mid-epoch
            raise Interrupt

    def on_train_epoch_end(self, trainer, module):
        # Where ModelCheckpoint writes last.ckpt in an epoch without validation
        # (trainer.check_val_every_n_epoch > 1, or no val batches).
        if self.where == "epoch-end" and trainer.current_epoch == self.stop_at[0]:
            trainer.save_checkpoint(self.ckpt)
            raise Interrupt

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # global_step - 1: the step this batch was trained at (the counter has moved on)
        self.seen.append((trainer.current_epoch, batch_idx, trainer.global_step - 1, batch[1].tolist()))
        if self.where == "end" and (trainer.current_epoch, batch_idx) == self.stop_at:
            trainer.save_checkpoint(self.ckpt)
            raise Interrupt


def _fit(root, tmp_path, record, ckpt_path=None, backend="torchvision"):
    return fit_until_interrupted(tmp_path, record, num_classes=36, ckpt_path=ckpt_path, root=str(root), backend=backend,
                                 batch_size=4, image_size=32, val_resize=32)


_FULL: dict[tuple[str, str], Record] = {}


def _uninterrupted(root, tmp_path_factory, backend: str) -> Record:
    """The uninterrupted run of ``backend`` on ``root``, once per test session (it is deterministic)."""
    if (backend, str(root)) not in _FULL:
        _FULL[backend, str(root)] = Record()
        _fit(root, tmp_path_factory.mktemp(f"full-{backend}"), _FULL[backend, str(root)], backend=backend)
    return _FULL[backend, str(root)]


# (epoch, batch) and where the checkpoint is written: at that batch's step's start or end, or at the
# end of that epoch (where ModelCheckpoint writes last.ckpt when the epoch has no validation).
CASES = {
    "mid-epoch-at-step-start": ((1, 3), "start"),
    "first-epoch-at-step-start": ((0, 5), "start"),
    "epoch-start-at-step-start": ((2, 0), "start"),
    "last-batch-at-step-start": ((0, 8), "start"),
    "mid-epoch-at-step-end": ((1, 3), "end"),
    "first-batch-at-step-end": ((2, 0), "end"),
    "last-batch-at-step-end": ((0, 8), "end"),
    "first-epoch-at-its-end": ((0, 9), "epoch-end"),
    "second-epoch-at-its-end": ((1, 9), "epoch-end"),
}


@pytest.mark.parametrize("stop_at,where", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("source", ["folders", "pack"])
@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
def test_resumed_run_feeds_the_same_sequence_as_an_uninterrupted_one(request, tmp_path, tmp_path_factory,
                                                                     backend, source, stop_at, where):
    """From a tree or from its pack (tar shards, read in the shard order)."""
    if backend.startswith("dali"):
        skip_without_dali()
    one_image_per_class = request.getfixturevalue(
        "one_image_per_class" if source == "folders" else "one_image_per_class_packed")
    full = _uninterrupted(one_image_per_class, tmp_path_factory, backend)
    steps = 36 // 4
    assert len(full.seen) == 3 * steps

    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    first = Record(stop_at=stop_at, ckpt=ckpt, where=where)
    _fit(one_image_per_class, tmp_path / "a", first, backend=backend)
    state = torch.load(ckpt, weights_only=True)["ImageNetDataModule"]
    # The data position: the batches of the epoch whose step has run, whatever the loader fetched.
    assert state == {"epoch": stop_at[0], "batches_done": stop_at[1] + (where == "end")}, state

    second = Record()
    trainer = _fit(one_image_per_class, tmp_path / "b", second, ckpt_path=str(ckpt), backend=backend)
    assert first.seen + second.seen == full.seen  # same images, same order, same global steps
    assert trainer.global_step == 3 * steps
    fed = [label for epoch, _, _, labels in first.seen + second.seen if epoch == stop_at[0] for label in labels]
    assert sorted(fed) == sorted(set(fed))  # within the interrupted epoch, no image twice
