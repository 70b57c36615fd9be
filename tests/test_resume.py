"""Interrupted and resumed training feeds exactly the images an uninterrupted run feeds."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from data_pipelines.datamodule import ImageNetDataModule
from data_pipelines.sample import make_sample_tree
from trainer.callbacks import AtomicCheckpointIO
from trainer.models import build_model
from trainer.module import Classifier


@pytest.fixture(scope="module")
def one_image_per_class(tmp_path_factory):
    """48 classes of one train image each: a batch's labels name exactly the images in it."""
    return make_sample_tree(tmp_path_factory.mktemp("ids"), num_classes=36, train_per_class=1, val_per_class=1,
                            image_size=(32, 32))


class Interrupt(Exception):
    pass


class Record(pl.Callback):
    def __init__(self, stop_at=None, ckpt=None):
        self.seen, self.stop_at, self.ckpt = [], stop_at, ckpt

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.stop_at:
            trainer.save_checkpoint(self.ckpt)  # what the SLURM USR1 handler does, mid-epoch
            raise Interrupt
        self.seen.append((trainer.current_epoch, batch_idx, trainer.global_step, batch[1].tolist()))


def _fit(root, tmp_path, record, ckpt_path=None):
    pl.seed_everything(0)
    dm = ImageNetDataModule(root=str(root), backend="torchvision", on_gpu=False, batch_size=4, image_size=32,
                            val_resize=32, num_workers=0, seed=3, filelist_cache=False)
    module = Classifier(build_model("resnet20", 36), num_classes=36, batch_size=4, lr=0.1, momentum=0.9)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[record], use_distributed_sampler=False,
                         num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
                         plugins=[AtomicCheckpointIO()])
    try:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    except Interrupt:
        pass
    return trainer


@pytest.mark.parametrize("stop_at", [(1, 3), (0, 5), (2, 0)], ids=["mid-epoch", "first-epoch", "epoch-start"])
def test_resumed_run_feeds_the_same_sequence_as_an_uninterrupted_one(one_image_per_class, tmp_path, stop_at):
    full = Record()
    _fit(one_image_per_class, tmp_path / "full", full)
    steps = 36 // 4
    assert len(full.seen) == 3 * steps

    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    first = Record(stop_at=stop_at, ckpt=ckpt)
    _fit(one_image_per_class, tmp_path / "a", first)
    state = torch.load(ckpt, weights_only=True)["ImageNetDataModule"]
    assert state == {"epoch": stop_at[0], "batches_done": stop_at[1]}

    second = Record()
    trainer = _fit(one_image_per_class, tmp_path / "b", second, ckpt_path=str(ckpt))
    assert first.seen + second.seen == full.seen  # same images, same order, same global steps
    assert trainer.global_step == 3 * steps
    fed = [label for epoch, _, _, labels in first.seen + second.seen if epoch == stop_at[0] for label in labels]
    assert sorted(fed) == sorted(set(fed))  # within the interrupted epoch, no image twice
