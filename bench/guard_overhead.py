"""The non-finite guard's cost per training step (trainer/cluster/guard.py): our fit with
``guard.enabled=true`` against ``false``, same model, data and batch.

    python bench/guard_overhead.py                                  # resnet20 and resnet18, CPU sizes
    python bench/guard_overhead.py --archs resnet50 --image-size 64 --batch 16 --device gpu

Each setting runs trainer.run's build_datamodule + build_module + build_trainer and Trainer.fit on
synthetic data (checkpointing, logging and every callback included), timed from the end of step
``--warmup`` to the end of the fit; the two settings take turns, ``--rounds`` times, and the table
gives the median ms per step and the ratio. The guard's work per step: one foreach copy of the
weights, BatchNorm buffers and optimiser state, a foreach norm of the gradients, and a
``torch.where`` per tensor after the step. Results belong in bench/RESULTS.md with their machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Clock(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.end, self.steps = time.perf_counter(), self.steps + 1


def one_fit(arch: str, *, guard: bool, batch: int, image_size: int, steps: int, warmup: int, device: str) -> float:
    from trainer.config import load_config
    from trainer.run import build_datamodule, build_module, build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([
            "data.backend=synthetic", f"data.batch_size={batch}", f"data.image_size={image_size}",
            f"data.val_resize={image_size}", f"data.synthetic_size={batch * (steps + warmup)}", "data.num_workers=0",
            f"model.arch={arch}", "model.num_classes=10", f"trainer.accelerator={device}", "trainer.max_epochs=1",
            "trainer.limit_val_batches=0", "trainer.log_every_n_steps=50", "logger.wandb.mode=disabled",
            f"guard.enabled={str(guard).lower()}", f"run.dir={tmp}/run",
        ])
        clock = _Clock(warmup)
        dm = build_datamodule(cfg)
        trainer = build_trainer(cfg, Path(tmp) / "run", for_fit=True)
        trainer.callbacks.append(clock)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(build_module(cfg, dm.classes), datamodule=dm)
        return (clock.end - clock.start) / clock.steps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet20,resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.disable(logging.WARNING)
    print("| arch | params | guard off ms/step | guard on ms/step | on / off |")
    print("|---|---|---|---|---|")
    for arch in args.archs.split(","):
        from trainer.recipe.models import build_model

        params = sum(p.numel() for p in build_model(arch, 10).parameters())
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for guard in (False, True):
                times[guard].append(one_fit(arch, guard=guard, batch=args.batch, image_size=args.image_size,
                                            steps=args.steps, warmup=args.warmup, device=args.device))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {arch} | {params / 1e6:.2f} M | {off:.1f} | {on:.1f} | {on / off:.3f} |", flush=True)


if __name__ == "__main__":
    main()
