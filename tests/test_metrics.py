"""What the logged metrics mean: float32 logits under mixed precision, epoch values over every rank,
the throughput summed over ranks, the plain cross-entropy beside the smoothed loss, and a sanity
validation that fails a broken validation set before any training step."""
from __future__ import annotations

import os
import socket

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_pipelines.synthetic import SyntheticLoader
from trainer.callbacks import sum_over_ranks
from trainer.recipe.models import build_model
from trainer.module import Classifier
from trainer.recipe.specs import LossSpec, OptimSpec


def test_loss_and_metrics_get_float32_logits_under_bf16_autocast():
    module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=4, optim=OptimSpec(lr=0.1, momentum=0.9))
    seen = []
    module.criterion.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(images).dtype == torch.bfloat16  # the model itself computes in bf16
        logits = module.logits(images)
        module.criterion(logits, labels)
    assert logits.dtype == torch.float32 and seen == [torch.float32]


def test_val_ce_is_plain_cross_entropy_and_val_loss_the_smoothed_one(tmp_path):
    module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=4, optim=OptimSpec(lr=0.1, momentum=0.9),
                        loss=LossSpec(label_smoothing=0.3))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    loader = SyntheticLoader(num_batches=2, batch_size=4, image_size=32, num_classes=4, seed=0)
    (metrics,) = trainer.validate(module, loader, verbose=False)
    images, labels = loader.images, loader.labels
    module.eval()
    with torch.no_grad():
        logits = module.logits(images)
    assert metrics["val/ce"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.3)
    assert metrics["val/loss"] == pytest.approx(float(smoothed), rel=1e-5)
    assert metrics["val/loss"] != pytest.approx(metrics["val/ce"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sum_worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out[rank] = sum_over_ranks(100.0 * (rank + 1), dist.new_group(backend="gloo"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_images_per_sec_total_is_the_sum_of_every_ranks_rate():
    """Rank rates 100 and 200 make 300 on both ranks; rank 0's rate times the world size (what was
    logged before) would say 200."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sum_worker, args=(_free_port(), out), nprocs=2)
        assert dict(out) == {0: 300.0, 1: 300.0}
    assert sum_over_ranks(42.0, None) == 42.0


class _LossesPerRank(pl.Callback):
    def __init__(self, out):
        self.out = out
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, module):
        self.out[trainer.global_rank] = (self.losses, float(trainer.callback_metrics["train/loss_epoch"]))


def _ddp_worker(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE="2")
    from lightning_fabric.plugins.environments import LightningEnvironment

    module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=4, optim=OptimSpec(lr=0.1, momentum=0.9))
    record = _LossesPerRank(out)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[record], use_distributed_sampler=False,
                         plugins=[LightningEnvironment()])
    # Different data on each rank, so that the ranks' losses differ.
    trainer.fit(module, SyntheticLoader(num_batches=3, batch_size=4, image_size=32, num_classes=4, seed=rank))


@pytest.mark.slow
def test_train_loss_epoch_is_the_mean_over_every_rank():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(_free_port(), out), nprocs=2)
        results = dict(out)
    every = [loss for rank in (0, 1) for loss in results[rank][0]]
    assert results[0][0] != results[1][0]
    for rank in (0, 1):  # each rank logs the mean over both ranks' batches (equal sizes), not its own
        assert results[rank][1] == pytest.approx(sum(every) / len(every), rel=1e-5)


def _cfg(root, run_dir, backend, extra=()):
    from trainer.config import load_config

    return load_config(["experiment=smoke", f"data.root={root}", f"data.backend={backend}", "data.batch_size=8",
                        "data.num_workers=1", "logger.wandb.mode=disabled", f"run.dir={run_dir}", *extra])


@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
def test_a_broken_validation_set_fails_before_the_first_training_step(tmp_path, backend):
    from data_pipelines.sample import make_sample_tree
    from trainer.run import fit

    root = make_sample_tree(tmp_path / "data", num_classes=4, train_per_class=16, val_per_class=4, image_size=(32, 32))
    bad = sorted((root / "val").rglob("*.JPEG"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the first image validation reads
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match=bad.name):
        fit(_cfg(root, run_dir, backend))
    assert not (run_dir / "checkpoints").exists()  # no epoch was trained first
    metrics = run_dir / "metrics.csv"
    assert not metrics.exists() or "train/loss_step" not in metrics.read_text()


def test_the_sanity_check_leaves_no_dali_validation_pipeline_alive_during_training(tiny_root, tmp_path):
    from trainer.run import build_datamodule, build_module, build_trainer

    alive = []

    class Check(pl.Callback):
        def on_train_start(self, trainer, module):
            alive.append(trainer.val_dataloaders._pipe is not None)  # noqa: SLF001

    cfg = _cfg(tiny_root, tmp_path / "run", "dali_cpu", ["trainer.max_epochs=1"])
    dm = build_datamodule(cfg)
    trainer = build_trainer(cfg, tmp_path / "run", for_fit=True)
    trainer.callbacks.append(Check())
    trainer.fit(build_module(cfg, dm.classes), datamodule=dm)
    assert trainer.sanity_checking is False and alive == [False]
