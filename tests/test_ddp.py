"""DDP is the same optimisation as one process with the global batch.

The two ranks are separate processes started as srun or torchrun starts them (tests/_ddp_rank.py),
not by ddp_spawn: nothing comes back through a spawn queue. Rank 0 writes its weights to a file, and
neither rank exits before both are past a final barrier, so nothing depends on the order in which
they shut down; the test reads that file once both exited 0.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from torch.utils.data import DataLoader, TensorDataset

from data_pipelines.sharding import EpochSampler
from trainer.recipe.models import build_model
from trainer.module import Classifier
from trainer.recipe.specs import LossSpec, OptimSpec

pytestmark = pytest.mark.slow

N, STEPS, SEED = 48, 3, 5
REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("_ddp_rank.py")
HANG_GUARD_S = 600  # only against a hang: a rank that fails ends the wait at once


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


def train(devices: int, batch_size: int) -> dict[str, torch.Tensor]:
    """The model's weights after STEPS steps: this process alone (devices=1), or this process as one
    rank of a 2-process DDP job whose process group is already initialised (tests/_ddp_rank.py)."""
    torch.manual_seed(0)
    module = FrozenBNClassifier(build_model("resnet20", 4), num_classes=4, batch_size=batch_size,
                                optim=OptimSpec(lr=0.8, momentum=0.9, weight_decay=1e-3),
                                loss=LossSpec(label_smoothing=0.1))
    # An explicit LightningEnvironment: ranks from LOCAL_RANK/NODE_RANK, even when the suite itself
    # runs inside a SLURM job (SLURM's would be detected first and give both ranks SLURM_PROCID).
    trainer = pl.Trainer(accelerator="cpu", devices=devices, num_nodes=1, strategy="ddp" if devices > 1 else "auto",
                         plugins=[LightningEnvironment()] if devices > 1 else None,
                         max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         use_distributed_sampler=False)
    trainer.fit(module, FixedData(batch_size))
    return module.model.state_dict()


def _run_two_ranks(out: Path) -> None:
    """Both ranks as separate processes; returns once both exited 0, fails as soon as one did not."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = []
    for rank in (0, 1):
        with open(out / f"rank{rank}.log", "w") as log:  # a file, not a pipe: nothing to drain meanwhile
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), str(rank)], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    # Woken by each exit (a pidfd becomes readable), not by the clock.
    exits, poller = {os.pidfd_open(p.pid): rank for rank, p in enumerate(procs)}, select.poll()
    for fd in exits:
        poller.register(fd, select.POLLIN)
    failed = None
    try:
        while exits and failed is None:
            ready = poller.poll(HANG_GUARD_S * 1000)
            if not ready:
                failed = f"ranks {sorted(exits.values())} still running: no exit for {HANG_GUARD_S}s (a hang)"
            for fd, _ in ready:
                poller.unregister(fd)
                rank = exits.pop(fd)
                os.close(fd)
                if procs[rank].wait() != 0:
                    failed = f"rank {rank} exited {procs[rank].returncode}"
    finally:
        for fd in exits:
            os.close(fd)
        for p in procs:  # a failed rank's peer may be waiting for it for ever
            if p.poll() is None:
                p.kill()
            p.wait()
    if failed:
        logs = "\n".join(f"--- rank {rank}:\n" + (out / f"rank{rank}.log").read_text()[-4000:] for rank in (0, 1))
        pytest.fail(f"{failed}\n{logs}")


def test_two_ranks_with_batch_b_equal_one_rank_with_batch_2b(tmp_path):
    one = train(1, 8)
    _run_two_ranks(tmp_path)
    two = torch.load(tmp_path / "two.pt")
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
