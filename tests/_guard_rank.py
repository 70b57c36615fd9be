"""One rank of tests/test_guard.py's 2-process DDP (gloo) fit through the trainer's own Trainer,
DataModule and Classifier (trainer.run), started as srun or torchrun starts a rank.

    python tests/_guard_rank.py OUT RANK DATA_ROOT [rollback]

Each rank writes its weights and its guard's skip count to OUT/rank<RANK>.pt; both pass one barrier
before either exits.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

out, rank, root = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ.update(WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from trainer.cluster.guard import NonFiniteGuard  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.run import build_datamodule, build_module, build_trainer  # noqa: E402

dist.init_process_group("gloo", init_method=(out / "rendezvous").as_uri(), rank=rank, world_size=2,
                        timeout=timedelta(seconds=300))
cfg = load_config([
    "experiment=smoke", "data.backend=torchvision", "data.num_workers=0", "trainer.accelerator=cpu",
    f"data.root={root}", "data.batch_size=4", "trainer.devices=2", "trainer.max_epochs=1",
    "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "logger.wandb.mode=disabled",
    "guard.check_every_n_steps=4",  # two checks (steps 4 and 8): their verdicts all-reduced
    f"run.dir={out / 'run'}",
])
if len(sys.argv) > 4:  # "rollback": the CLI's fit (trainer.run.fit) for 2 epochs, rolling back once
    from trainer.config import apply_overrides
    from trainer.run import fit

    cfg = apply_overrides(cfg, ["trainer.max_epochs=2", "guard.max_skips=2", "guard.check_every_n_steps=2",
                                "trainer.limit_val_batches=1"])
    summary = fit(cfg)
    if rank == 0:
        torch.save(summary, out / "summary.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0)
torch.manual_seed(0)
dm = build_datamodule(cfg)
trainer = build_trainer(cfg, out / "run", for_fit=True)
module = build_module(cfg, dm.classes)
trainer.fit(module, datamodule=dm)
guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
torch.save({"state_dict": module.state_dict(), "skipped": float(guard._counts[0]), "step": trainer.global_step},
           out / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
