"""Our Lightning ``fit`` against a plain PyTorch training loop: same model, optimizer, data and batch.

    python bench/loop_overhead.py            # a GPU: ResNet-50, 256 images, bf16; the CPU: ResNet-18, 16, 112 px
    python bench/loop_overhead.py --arch resnet20 --batch 8 --image-size 32 --steps 4 --rounds 1   # seconds

Three loops take turns, ``--rounds`` times:

    plain           forward, loss, backward, SGD step, LR schedule step, zero_grad: the Classifier's
                    model, loss, parameter groups, SGD implementation (fused on a GPU) and schedule
    plain+metrics   the same plus what Classifier.training_step adds: train top-1 (torchmetrics) and
                    the loss's running mean, kept on the device
    lightning       trainer.run's build_module + build_trainer (checkpointing, Throughput, progress
                    lines, CSV logger) and Trainer.fit

Every loop reads the same random batch, created once on the device (our synthetic DataModule
yields CPU tensors, which a GPU step would copy every time; that is a data cost, not the loop's).
Each is timed over ``--steps`` steps after ``--warmup``, synchronising the device at the window's
edges only (whole iterations: fetching, logging and callbacks included). The table gives the
median over rounds and the ratio to the plain loop; the goal is at most 1.05. On a GPU an untimed
pass also counts host synchronisations per step (torch.cuda.set_sync_debug_mode), naming where
they come from. Results belong in bench/RESULTS.md with their machine.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_throughput import AUTOCAST, Clock, WindowTimer, environment, parse_device  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.module import param_groups, sgd_implementation, warmup_cosine  # noqa: E402
from trainer.recipe.models import build_model  # noqa: E402
from trainer.run import build_module, build_trainer  # noqa: E402

GOAL_RATIO = 1.05
NUM_CLASSES = 1000
LOOPS = ("plain", "plain+metrics", "lightning")


class DeviceBatches:
    """``n`` times the same (images, labels), already on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> None:
        self.images, self.labels, self.n = images, labels, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.images, self.labels


def config(args, run_dir: Path):
    gpu = args.device.type == "cuda"
    return load_config([
        "data.backend=synthetic", f"data.batch_size={args.batch}", f"data.image_size={args.image_size}",
        f"data.val_resize={args.image_size}", "data.num_workers=0", f"model.arch={args.arch}",
        f"model.num_classes={NUM_CLASSES}", f"model.channels_last={str(args.channels_last).lower()}",
        f"model.compile={str(args.compile).lower()}", f"trainer.precision={args.precision}",
        f"trainer.accelerator={'gpu' if gpu else 'cpu'}", "trainer.devices=1", "trainer.max_epochs=1",
        "trainer.limit_val_batches=0", "logger.wandb.mode=disabled", f"run.dir={run_dir}",
    ])


def plain(args, cfg, batches: DeviceBatches, *, metrics: bool, on_step_end) -> None:
    """The plain loop; ``on_step_end(i)`` after every step (timing and sync counting hook in there)."""
    device = args.device
    m, o = cfg.model, cfg.optim
    model = build_model(m.arch, NUM_CLASSES, zero_init_residual=m.zero_init_residual, channels_last=m.channels_last)
    model = model.to(device)
    net = torch.compile(model) if m.compile else model
    optimizer = torch.optim.SGD(
        param_groups(model, o.weight_decay), lr=o.lr * args.batch / 256, momentum=o.momentum,
        nesterov=o.nesterov, **sgd_implementation(model.parameters()),
    )
    total = len(batches)
    warm = int(round(o.warmup_epochs * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps=warm, total_steps=total))
    criterion = nn.CrossEntropyLoss(label_smoothing=o.label_smoothing)
    dtype = AUTOCAST.get(args.precision)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "16-mixed" else None
    if metrics:
        from torchmetrics.classification import MulticlassAccuracy

        top1 = MulticlassAccuracy(NUM_CLASSES, top_k=1, average="micro", validate_args=False).to(device)
        loss_sum = torch.zeros((), device=device)
    model.train()
    for i, (images, labels) in enumerate(batches):
        if m.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = net(images)
            loss = criterion(logits, labels)
        if metrics:
            top1(logits, labels)
            loss_sum += loss.detach() * labels.shape[0]
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        on_step_end(i)


def lightning(args, cfg, run_dir: Path, batches: DeviceBatches, callbacks: list[pl.Callback]) -> None:
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # e.g. "ModelCheckpoint(monitor='val/top1') could not find ..."
        module = build_module(cfg, classes)
        trainer = build_trainer(cfg, run_dir, for_fit=True)
        trainer.callbacks.extend(callbacks)
        trainer.fit(module, train_dataloaders=batches)


# -- timing ---------------------------------------------------------------------------------------
def time_loop(name: str, args, cfg, run_dir: Path, images, labels) -> float:
    """Seconds per step of loop ``name`` over ``args.steps`` steps after ``args.warmup``."""
    clock = Clock(args.device)
    batches = DeviceBatches(images, labels, args.warmup + args.steps)
    if name == "lightning":
        timer = WindowTimer(args.warmup, args.steps, 1, clock.sync)
        lightning(args, cfg, run_dir, batches, [timer])
        (window,) = timer.windows
        return window / args.steps
    marks = []

    def on_step_end(i: int) -> None:
        if i + 1 in (args.warmup, args.warmup + args.steps):
            clock.sync()
            marks.append(time.perf_counter())

    plain(args, cfg, batches, metrics=name == "plain+metrics", on_step_end=on_step_end)
    return (marks[1] - marks[0]) / args.steps


# -- host synchronisations (CUDA) -------------------------------------------------------------------
class SyncCounter:
    """Counts host syncs (torch.cuda.set_sync_debug_mode) from the end of step ``first`` to the end
    of step ``first + steps``: the whole of ``steps`` loop iterations."""

    def __init__(self, first: int, steps: int) -> None:
        self.first, self.steps = first, steps
        self.where: collections.Counter = collections.Counter()
        self._catcher = None

    def step_end(self, i: int) -> None:
        if i == self.first:
            self._catcher = warnings.catch_warnings(record=True)
            self._records = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif i == self.first + self.steps and self._catcher is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catcher.__exit__(None, None, None)
            self._catcher = None
            for w in self._records:
                if "synchroniz" in str(w.message):
                    self.where[f"{Path(w.filename).name}:{w.lineno}"] += 1

    @property
    def per_step(self) -> float:
        return sum(self.where.values()) / self.steps


class _SyncCallback(pl.Callback):
    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counter.step_end(batch_idx)


def count_syncs(name: str, args, cfg, run_dir: Path, images, labels, steps: int = 4) -> SyncCounter:
    counter = SyncCounter(first=2, steps=steps)
    batches = DeviceBatches(images, labels, 2 + steps + 2)
    if name == "lightning":
        lightning(args, cfg, run_dir, batches, [_SyncCallback(counter)])
    else:
        plain(args, cfg, batches, metrics=name == "plain+metrics", on_step_end=counter.step_end)
    return counter


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu; another GPU: CUDA_VISIBLE_DEVICES")
    p.add_argument("--arch", default=None, help="default resnet50 on a GPU, resnet18 on the CPU")
    p.add_argument("--batch", type=int, default=None, help="default 256 on a GPU, 16 on the CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 224 on a GPU, 112 on the CPU")
    p.add_argument("--precision", default=None, choices=["bf16-mixed", "16-mixed", "32-true"],
                   help="default bf16-mixed on a GPU, 32-true on the CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default on for a GPU, off on the CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in every loop")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on a GPU, 10 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on a GPU, 3 on the CPU)")
    p.add_argument("--rounds", type=int, default=3, help="turns each loop takes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a shared CPU, 1 avoids threads spinning while descheduled)")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json too")
    args = p.parse_args(argv)
    args.device = parse_device(args.device)
    gpu = args.device.type == "cuda"
    defaults = dict(arch=("resnet50", "resnet18"), batch=(256, 16), image_size=(224, 112),
                    precision=("bf16-mixed", "32-true"), channels_last=(True, False), steps=(30, 10), warmup=(10, 3))
    for key, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = args.device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.cuda.set_device(args.device)
        torch.backends.cudnn.benchmark = True  # as trainer.run.use_fast_gpu_math does for Lightning
        torch.set_float32_matmul_precision("high")
    env = environment(args.device)
    tmp = tempfile.TemporaryDirectory(prefix="loop_overhead_")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(args.device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(args.device)

    times = {name: [] for name in LOOPS}
    for r in range(args.rounds):
        for name in LOOPS:
            run_dir = Path(tmp.name) / f"{name}-{r}"
            cfg = config(args, run_dir)
            times[name].append(time_loop(name, args, cfg, run_dir, images, labels))
            print(f"  round {r + 1} {name}: {1e3 * times[name][-1]:.2f} ms/step", flush=True)
    syncs = {}
    if gpu:
        for name in LOOPS:
            run_dir = Path(tmp.name) / f"{name}-syncs"
            syncs[name] = count_syncs(name, args, config(args, run_dir), run_dir, images, labels)

    base = statistics.median(times["plain"])
    lines = ["| loop | ms/step (median) | min | max | img/s | ratio to plain | host syncs/step | where |",
             "|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in LOOPS:
        med = statistics.median(times[name])
        c = syncs.get(name)
        where = ", ".join(f"{k} x{v}" for k, v in c.where.most_common(3)) if c else ""
        rows.append({"loop": name, "ms_per_step": 1e3 * med, "min_ms": 1e3 * min(times[name]),
                     "max_ms": 1e3 * max(times[name]), "images_per_sec": args.batch / med, "ratio": med / base,
                     "syncs_per_step": c.per_step if c else None, "sync_sites": dict(c.where) if c else None})
        lines.append(f"| {name} | {1e3 * med:.2f} | {1e3 * min(times[name]):.2f} | {1e3 * max(times[name]):.2f} "
                     f"| {args.batch / med:,.1f} | {med / base:.3f} | {'' if c is None else f'{c.per_step:g}'} | {where} |")
    ratio = statistics.median(times["lightning"]) / base
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    header = (f"{env['date']}: {env['device']} ({env['torch_threads']} torch threads); torch {env['torch']}, "
              f"Lightning {env['lightning']}; {args.arch}, batch {args.batch}, {args.image_size}px, "
              f"{args.precision}, {'channels_last' if args.channels_last else 'NCHW'}"
              f"{', compiled' if args.compile else ''}; {args.rounds} rounds of {args.steps} steps after "
              f"{args.warmup} warm-up")
    text = (f"{header}\n\n" + "\n".join(lines) +
            f"\n\nLightning / plain = {ratio:.3f} (goal at most {GOAL_RATIO}: {verdict})\n")
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out + ".md").write_text(text)
        settings = {k: str(v) for k, v in vars(args).items()}
        Path(args.out + ".json").write_text(json.dumps({"env": env, "args": settings, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
