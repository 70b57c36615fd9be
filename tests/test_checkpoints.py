"""Checkpoints a long run relies on: old preemption checkpoints are pruned only once a newer one
loads, every write is durable, and a resume that changes what the lr schedule and the data
position were derived from is refused unless asked for, then said and handled."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import stat

import pytest
import pytorch_lightning as pl
import torch

from data_pipelines.datamodule import ImageNetDataModule
from data_pipelines.specs import DataSpec
from data_pipelines.sample import make_sample_tree
from trainer.callbacks import AtomicCheckpointIO, RestartResumedEpoch
from trainer.config import ConfigError, load_config
from trainer.recipe.models import build_model
from trainer.module import Classifier
from trainer.recipe.specs import OptimSpec
from trainer.cluster.preemption import Preempted, RequeueOnSignal, prune_hpc_checkpoints
from trainer.run import fit, resume_changes

# --- pruning hpc_ckpt_N.ckpt -------------------------------------------------------------------


def _write_ckpts(run_dir, numbers):
    for n in numbers:
        torch.save({"state_dict": {"w": torch.full((4,), float(n))}}, run_dir / f"hpc_ckpt_{n}.ckpt")


def _left(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt"))


def test_pruning_keeps_the_newest_k_by_number(tmp_path):
    _write_ckpts(tmp_path, [1, 2, 9, 10])  # 10 is newer than 9: numbers, not names, are compared
    deleted = prune_hpc_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert _left(tmp_path) == ["hpc_ckpt_10.ckpt", "hpc_ckpt_9.ckpt"]
    assert prune_hpc_checkpoints(tmp_path, keep=None) == [] and len(_left(tmp_path)) == 2


def test_pruning_deletes_nothing_while_the_newest_does_not_load(tmp_path):
    _write_ckpts(tmp_path, [1, 2, 3])
    newest = tmp_path / "hpc_ckpt_3.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut off mid-write
    assert prune_hpc_checkpoints(tmp_path, keep=1) == []
    assert _left(tmp_path) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]


def test_pruning_never_deletes_the_only_checkpoint(tmp_path):
    _write_ckpts(tmp_path, [4])
    assert prune_hpc_checkpoints(tmp_path, keep=1) == []
    assert _left(tmp_path) == ["hpc_ckpt_4.ckpt"]
    with pytest.raises(ValueError, match="keep=0"):
        RequeueOnSignal(tmp_path, requeue=None, keep=0)


class _SignalAt(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.slow
def test_a_preemption_checkpoint_prunes_the_older_ones(tmp_path):
    _write_ckpts(tmp_path, [1, 2])
    dm = ImageNetDataModule(DataSpec(root=None, backend="synthetic", batch_size=4, image_size=32, val_resize=32,
                                     num_workers=0, seed=0, synthetic_size=32, num_classes=4), on_gpu=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, use_distributed_sampler=False, default_root_dir=str(tmp_path),
                         callbacks=[RequeueOnSignal(tmp_path, requeue=None, keep=2), _SignalAt()])
    with pytest.raises(Preempted):
        trainer.fit(Classifier(build_model("resnet20", 4), num_classes=4, batch_size=4, optim=OptimSpec(lr=0.1, momentum=0.9)), dm)
    assert _left(tmp_path) == ["hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]


# --- durable writes ------------------------------------------------------------------------------


def test_checkpoint_is_synced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", "dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace",))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    # The rename keeps the inode: the file synced is the one now named last.ckpt.
    assert events == [("fsync", "file", path.stat().st_ino), ("replace",), ("fsync", "dir", tmp_path.stat().st_ino)]
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]


# --- resuming with other settings ------------------------------------------------------------------


def test_resume_changes_names_each_setting_and_treats_a_missing_world_size_as_unknown():
    ckpt = {"hyper_parameters": {"config": {"data": {"batch_size": 32}, "trainer": {"max_epochs": 90}}},
            "world_size": 8}
    assert resume_changes(ckpt, world_size=8, batch_size=32, max_epochs=90) == []
    # Same global batch on more devices: the data position still moves to other ranks.
    assert resume_changes(ckpt, world_size=16, batch_size=16, max_epochs=90) == [
        ("the world size (trainer.num_nodes x trainer.devices)", 8, 16)]
    assert resume_changes(ckpt, world_size=8, batch_size=64, max_epochs=100) == [
        ("the global batch (data.batch_size x world size)", 256, 512), ("trainer.max_epochs", 90, 100)]
    del ckpt["world_size"]  # written before it was saved: only the per-device batch can be compared
    assert resume_changes(ckpt, world_size=16, batch_size=32, max_epochs=90) == []
    assert resume_changes(ckpt, world_size=16, batch_size=64, max_epochs=90) == [("data.batch_size", 32, 64)]


def _overrides(run_dir, *more):
    return ["data.backend=synthetic", "model.arch=resnet20", "model.num_classes=4", "data.synthetic_size=32",
            "data.batch_size=4", "data.image_size=32", "data.val_resize=32", "trainer.accelerator=cpu",
            "trainer.max_epochs=1", "trainer.limit_val_batches=2", "logger.wandb.mode=disabled",
            f"run.dir={run_dir}", *more]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished 1-epoch run (batch 4, one process); each test resumes a copy of it."""
    run_dir = tmp_path_factory.mktemp("one-epoch") / "run"
    fit(load_config(_overrides(run_dir)))
    return run_dir


@pytest.fixture
def run_dir(one_epoch, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(one_epoch, copy)
    return copy


@pytest.mark.slow
def test_checkpoint_records_its_world_size(one_epoch):
    assert torch.load(one_epoch / "checkpoints" / "last.ckpt", weights_only=True)["world_size"] == 1


@pytest.mark.slow
def test_resume_with_another_batch_is_refused_naming_the_setting_and_both_values(run_dir):
    config_yaml = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        fit(load_config(_overrides(run_dir, "trainer.max_epochs=2", "data.batch_size=8")))
    msg = str(err.value)
    assert str(run_dir / "checkpoints" / "last.ckpt") in msg
    assert "the global batch (data.batch_size x world size) 4 (this run: 8)" in msg
    assert "trainer.max_epochs 1 (this run: 2)" in msg
    assert "run.allow_resume_change=true" in msg
    assert (run_dir / "config.yaml").read_text() == config_yaml  # the refused run changed nothing


@pytest.mark.slow
def test_resume_with_only_more_epochs_is_refused_too(run_dir):
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs 1 \(this run: 2\)"):
        fit(load_config(_overrides(run_dir, "trainer.max_epochs=2")))


@pytest.mark.slow
def test_resume_with_the_same_settings_says_nothing(run_dir, caplog):
    with caplog.at_level(logging.WARNING):
        summary = fit(load_config(_overrides(run_dir)))
    assert summary["global_step"] == 8
    assert not [r for r in caplog.records if "allow_resume_change" in r.getMessage()]


@pytest.mark.slow
def test_allowed_resume_change_warns_what_is_re_derived_and_runs(run_dir, caplog):
    before = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    with caplog.at_level(logging.WARNING, logger="imagenet_trainer"):
        summary = fit(load_config(_overrides(run_dir, "trainer.max_epochs=2", "data.batch_size=8",
                                             "run.allow_resume_change=true")))
    [warning] = [r for r in caplog.records if "run.allow_resume_change=true" in r.getMessage()]
    said = warning.getMessage()
    assert warning.levelno == logging.WARNING
    assert "the global batch (data.batch_size x world size) 4 (this run: 8)" in said
    assert "trainer.max_epochs 1 (this run: 2)" in said
    assert "schedule's length is re-derived" in said and "start of the checkpoint's epoch" in said
    assert "peak lr stays the checkpoint's (0.004)" in said  # 0.256 x 4 / 256
    assert "restarts from its first batch" in said
    # Epoch 2 of the new size: 32 images / 8 per step.
    assert summary["epochs"] == 2 and summary["global_step"] == 8 + 4
    # What the warning says of the peak lr: the scheduler's base lr is the checkpoint's.
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["lr_schedulers"][0]["base_lrs"] == before["lr_schedulers"][0]["base_lrs"] == [0.004, 0.004]


# --- a restarted epoch under Lightning's restored counters -----------------------------------------


class _Interrupt(Exception):
    pass


class _Record(pl.Callback):
    """The labels of each trained batch; with ``stop_at`` (epoch, batch), a checkpoint there (at the
    batch's start, as RequeueOnSignal writes it, or at its end, as ModelCheckpoint does), then a stop."""

    def __init__(self, stop_at=None, ckpt=None, where="start"):
        self.seen, self.stop_at, self.ckpt, self.where = [], stop_at, ckpt, where

    def _maybe_stop(self, trainer, batch_idx, where):
        if self.where == where and (trainer.current_epoch, batch_idx) == self.stop_at:
            trainer.save_checkpoint(self.ckpt)
            raise _Interrupt

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._maybe_stop(trainer, batch_idx, "start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch_idx, batch[1].tolist()))
        self._maybe_stop(trainer, batch_idx, "end")


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory):
    """36 classes of one train image each: a batch's labels are the ids of the images in it."""
    return make_sample_tree(tmp_path_factory.mktemp("ids"), num_classes=36, train_per_class=1, val_per_class=1,
                            image_size=(32, 32))


def _fit(root, tmp_path, batch_size, record, ckpt_path=None, restart=False):
    dm = ImageNetDataModule(DataSpec(root=str(root), backend="torchvision", batch_size=batch_size, image_size=32,
                                     val_resize=32, num_workers=0, seed=3, filelist_cache=False), on_gpu=False)
    callbacks = [record]
    if restart:
        dm.restart_epoch()
        callbacks.append(RestartResumedEpoch())
    module = Classifier(build_model("resnet20", 36), num_classes=36, batch_size=batch_size,
                        optim=OptimSpec(lr=0.1, momentum=0.9))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0,
                         default_root_dir=tmp_path)
    try:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    except _Interrupt:
        pass
    return trainer


@pytest.mark.parametrize("where", ["start", "end"])
@pytest.mark.slow
def test_a_restarted_epoch_trains_every_batch_of_the_new_size_once(ids_root, tmp_path, where):
    """Mid-epoch checkpoint at batch 4, epoch 1; resumed with batch 8: epoch 1 starts again and
    trains all its 4 batches of 8 (36 images), though Lightning restored 3 or 4 batches as done."""
    ckpt = tmp_path / "mid.ckpt"
    _fit(ids_root, tmp_path, 4, _Record(stop_at=(1, 3), ckpt=ckpt, where=where))
    resumed = _Record()
    trainer = _fit(ids_root, tmp_path, 8, resumed, ckpt_path=str(ckpt), restart=True)
    assert [(epoch, batch) for epoch, batch, _ in resumed.seen] == [(1, b) for b in range(4)]
    fed = [label for _, _, labels in resumed.seen for label in labels]
    assert len(fed) == len(set(fed)) == 32  # the whole epoch (36 images, 4 left over), none twice
    steps_before = 9 + 3 + (where == "end")  # epoch 0 of batch 4, then epoch 1's trained batches
    assert trainer.global_step == steps_before + 4


# --- last.ckpt is the newest state, best-*.ckpt the best -------------------------------------------


class _Scripted(pl.LightningModule):
    """A linear model whose val/top1 per epoch is given: the metric's course is the test's choice."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/top1", float(self.scores[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 4)), batch_size=2)


class _StopAtEpoch(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise _Interrupt  # a crash: no preemption checkpoint


def _scripted_fit(tmp_path, scores, *, checkpoint, stop_at=None, ckpt_path=None, check_val_every_n_epoch=1):
    callbacks = [checkpoint] + ([_StopAtEpoch(stop_at)] if stop_at is not None else [])
    trainer = pl.Trainer(max_epochs=len(scores), accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                         check_val_every_n_epoch=check_val_every_n_epoch, default_root_dir=tmp_path)
    try:
        trainer.fit(_Scripted(scores), ckpt_path=ckpt_path)
    except _Interrupt:
        pass
    return trainer


def _best_and_last(tmp_path):
    from trainer.callbacks import BestAndLastCheckpoint

    return BestAndLastCheckpoint(tmp_path / "checkpoints", filename="best-epoch{epoch:03d}",
                                 auto_insert_metric_name=False, monitor="val/top1", mode="max", save_top_k=1)


def _step(path):
    return torch.load(path, weights_only=False)["global_step"]


def test_lightnings_save_last_moves_only_on_improvement(tmp_path):
    """What our callback exists for: pinned, so that a Lightning that fixes it is noticed."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    cb = ModelCheckpoint(tmp_path / "checkpoints", monitor="val/top1", mode="max", save_top_k=1, save_last=True)
    _scripted_fit(tmp_path, [0.5, 0.4], checkpoint=cb)
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 4  # epoch 0's, not the final step 8


def test_last_ckpt_holds_the_final_state_when_the_final_epoch_does_not_improve(tmp_path):
    trainer = _scripted_fit(tmp_path, [0.5, 0.4], checkpoint=_best_and_last(tmp_path))
    ckpts = tmp_path / "checkpoints"
    assert _step(ckpts / "last.ckpt") == trainer.global_step == 8
    assert sorted(p.name for p in ckpts.glob("best-*.ckpt")) == ["best-epoch000.ckpt"]
    assert _step(ckpts / "best-epoch000.ckpt") == 4


def test_a_crash_after_a_non_improving_epoch_resumes_at_that_epochs_end(tmp_path):
    scores = [0.5, 0.4, 0.3]
    _scripted_fit(tmp_path, scores, checkpoint=_best_and_last(tmp_path), stop_at=2)  # crashes as epoch 2 starts
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _step(last) == 8
    resumed = _scripted_fit(tmp_path, scores, checkpoint=_best_and_last(tmp_path), ckpt_path=str(last))
    assert resumed.global_step == 12  # epoch 2 only: epochs 0 and 1 were not trained again
    best = resumed.checkpoint_callback
    assert best.best_model_score == 0.5 and best.best_model_path.endswith("best-epoch000.ckpt")


def test_last_ckpt_moves_in_epochs_without_validation(tmp_path):
    cb = _best_and_last(tmp_path)
    _scripted_fit(tmp_path, [0.5, 0.4, 0.3], checkpoint=cb, stop_at=2, check_val_every_n_epoch=2)
    assert _step(tmp_path / "checkpoints" / "last.ckpt") == 8  # epoch 1 ran no validation


# --- the lr schedule after a resume with other steps per epoch -----------------------------------


def _lr_course(run_dir, ckpt_dir=None) -> list[tuple[int, float]]:
    """(step, lr / peak lr) of every training step in ``run_dir``'s metrics.csv; the peak is the
    scheduler's base lr in the run's last checkpoint (a resumed run keeps the checkpoint's)."""
    import csv

    peak = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["lr_schedulers"][0]["base_lrs"][0]
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [(int(r["step"]), float(r["lr"]) / peak) for r in csv.DictReader(f) if r.get("lr")]


def _schedule_overrides(run_dir, *more):
    return _overrides(run_dir, "trainer.log_every_n_steps=1", "optim.warmup_epochs=1", "optim.schedule=cosine",
                      *more)


def _assert_follows_epochs(resumed, fresh, *, first_epoch: int, steps_per_epoch: int):
    """Each resumed step's lr factor equals the fresh run's at the same point in epochs, within a step."""
    resumed_after = resumed[-(len(fresh) - first_epoch * steps_per_epoch):]
    assert len(resumed_after) == len(fresh) - first_epoch * steps_per_epoch
    for i, (_, factor) in enumerate(resumed_after):
        at = first_epoch * steps_per_epoch + i
        near = [fresh[j][1] for j in (at - 1, at, at + 1) if 0 <= j < len(fresh)]
        assert min(abs(factor - f) for f in near) < 1e-6, (i, factor, fresh[at])
    assert resumed_after[-1][1] > 0  # not the end of the cosine already


@pytest.mark.parametrize("old_batch, new_batch", [(4, 8), (8, 4)])
@pytest.mark.slow
def test_a_resume_with_another_batch_follows_the_schedule_in_epochs(tmp_path, old_batch, new_batch):
    run_dir, fresh_dir = tmp_path / "run", tmp_path / "fresh"
    fit(load_config(_schedule_overrides(run_dir, f"data.batch_size={old_batch}", "trainer.max_epochs=2")))
    fit(load_config(_schedule_overrides(run_dir, f"data.batch_size={new_batch}", "trainer.max_epochs=4",
                                        "run.allow_resume_change=true")))
    fit(load_config(_schedule_overrides(fresh_dir, f"data.batch_size={new_batch}", "trainer.max_epochs=4")))
    fresh = _lr_course(fresh_dir)
    assert len(fresh) == 4 * 32 // new_batch
    _assert_follows_epochs(_lr_course(run_dir), fresh, first_epoch=2, steps_per_epoch=32 // new_batch)


@pytest.mark.slow
def test_a_resume_on_fewer_processes_follows_the_schedule_in_epochs(tmp_path):
    from tests.conftest import run_cli

    run_dir, fresh_dir = tmp_path / "run", tmp_path / "fresh"
    two = run_cli("fit", *_schedule_overrides(run_dir, "trainer.max_epochs=2", "trainer.devices=2"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["steps_per_epoch"] == 4
    one = run_cli("fit", *_schedule_overrides(run_dir, "trainer.max_epochs=4", "run.allow_resume_change=true"))
    assert one.returncode == 0, one.stderr[-3000:]
    fit(load_config(_schedule_overrides(fresh_dir, "trainer.max_epochs=4")))
    _assert_follows_epochs(_lr_course(run_dir), _lr_course(fresh_dir), first_epoch=2, steps_per_epoch=8)
