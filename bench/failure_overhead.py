"""What the failure handling (trainer/cluster/failfast.py) costs a training step: watchdog off
(run.hang_timeout_s=null, the default) against on.

    python bench/failure_overhead.py                 # about a minute on a 2-core CPU
    python bench/failure_overhead.py --steps 400 --rounds 5

Two measurements, each taking turns ``--rounds`` times:

    hooks   FailFast's per-step hooks (on_train_batch_start, on_train_batch_end) called directly,
            ``--calls`` times: the fixed cost it adds to every step, in microseconds
    fit     a Lightning fit of a tiny model (a linear layer on one CPU batch, so that a fixed
            per-step cost shows), ``--steps`` timed steps after ``--warmup``: without FailFast,
            with it and the watchdog off, with it and the watchdog on (timeout 600 s)

The table gives the median over rounds (min, max). Results belong in bench/RESULTS.md with their machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trainer.cluster.failfast import FailFast  # noqa: E402


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, n: int) -> None:
        self.n, self.batch = n, (torch.randn(32, 64), torch.randint(0, 10, (32,)))

    def __iter__(self):
        for _ in range(self.n):
            yield self.batch


class StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())


def _failfast(run_dir: Path, hang: float | None) -> FailFast:
    return FailFast(run_dir, pg_timeout_init_s=600, pg_timeout_s=120, hang_timeout_s=hang)


def time_hooks(calls: int, hang: float | None, run_dir: Path) -> float:
    """Microseconds per step of FailFast's per-step hooks."""
    cb = _failfast(run_dir, hang)
    trainer = types.SimpleNamespace(global_rank=0, global_step=0, world_size=1)
    cb.setup(trainer, None, "fit")
    cb.on_train_batch_end(trainer, None, None, None, 0)  # the first step's one-off work
    t0 = time.perf_counter()
    for i in range(calls):
        cb.on_train_batch_start(trainer, None, None, i)
        cb.on_train_batch_end(trainer, None, None, None, i)
    elapsed = time.perf_counter() - t0
    cb._stop()
    return elapsed / calls * 1e6


def time_fit(steps: int, warmup: int, variant: str, run_dir: Path) -> float:
    """Milliseconds per step of a tiny fit."""
    times = StepTimes()
    callbacks: list[pl.Callback] = [times]
    if variant != "no FailFast":
        callbacks.insert(0, _failfast(run_dir, 600 if variant == "watchdog on" else None))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps + warmup + 1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks, default_root_dir=str(run_dir))
    loader = torch.utils.data.DataLoader(Batches(steps + warmup + 1), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), loader)
    window = times.starts[warmup: warmup + steps + 1]
    return (window[-1] - window[0]) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hooks = {"watchdog off": [], "watchdog on": []}
    fits = {"no FailFast": [], "watchdog off": [], "watchdog on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in hooks:
                hooks[name].append(time_hooks(args.calls, 600 if name == "watchdog on" else None, Path(tmp)))
            for name in fits:
                fits[name].append(time_fit(args.steps, args.warmup, name, Path(tmp)))
    print(f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, {args.threads} thread(s), "
          f"{args.rounds} rounds\n")
    print("| measurement | variant | median | min | max |\n|---|---|---|---|---|")
    for name, values in hooks.items():
        print(f"| hooks, us/step | {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    for name, values in fits.items():
        print(f"| tiny fit, ms/step | {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")


if __name__ == "__main__":
    main()
