"""DDP is the same optimisation as one process with the global batch."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from data_pipelines.sharding import EpochSampler
from trainer.models import build_model
from trainer.module import Classifier

N, STEPS, SEED = 48, 3, 5


class FixedData(pl.LightningDataModule):
    """Fixed tensors, sharded by global rank exactly as the real backends shard."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, 3, 16, 16, generator=gen)
        self.y = torch.randint(0, 4, (N,), generator=gen)

    def train_dataloader(self):
        sampler = EpochSampler(N, seed=SEED, shard_id=self.trainer.global_rank, num_shards=self.trainer.world_size,
                               batch_size=self.batch_size)
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, sampler=sampler, drop_last=True)


class FrozenBNClassifier(Classifier):
    """BatchNorm normalises with its running statistics (eval mode), so a batch split over two
    ranks is normalised as the whole batch is (SyncBatchNorm needs GPUs). Every parameter, the BN
    scales and shifts included, still trains."""

    def on_train_batch_start(self, batch, batch_idx):
        for m in self.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()


def _train(devices: int, batch_size: int, out):
    torch.manual_seed(0)
    module = FrozenBNClassifier(build_model("resnet20", 4), num_classes=4, batch_size=batch_size, lr=0.8, momentum=0.9,
                        weight_decay=1e-3, label_smoothing=0.1)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         use_distributed_sampler=False)
    trainer.fit(module, FixedData(batch_size))
    if trainer.is_global_zero:
        torch.save(module.model.state_dict(), out)


def test_two_ranks_with_batch_b_equal_one_rank_with_batch_2b(tmp_path):
    _train(1, 8, tmp_path / "one.pt")
    _train(2, 4, tmp_path / "two.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    moved = 0
    for key in one:
        if one[key].is_floating_point():  # every weight, bias and BN scale/shift
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
            moved += 1
    assert moved > 50
    # ...and training did change the weights (the comparison is not of two untouched inits).
    torch.manual_seed(0)
    init = build_model("resnet20", 4).state_dict()
    assert not torch.allclose(init["fc.weight"], one["fc.weight"])
