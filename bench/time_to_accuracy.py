"""Time to accuracy of the recipes, as a CPU-scale proxy: val top-1 against training time.

    python bench/time_to_accuracy.py                      # all recipes, on generated sample data
    python bench/time_to_accuracy.py --recipes rn50_90ep rn50_ffcv_16ep --epoch-scale 0.1

Every recipe in ``--recipes`` is scaled down the same way: its epoch-valued keys (max_epochs,
warmup, the lr peak and milestones, the progressive-resizing ramp) by ``--epoch-scale`` and its
pixel-valued keys (train and validation crops, the validation resize, the progressive sizes and
their step) by ``--pixel-scale``, and trained on the same generated sample data
(``imagenet-trainer sample-data``: coloured shapes on noise) with the same small network
(``--arch``, default resnet20: ResNet-50 at ImageNet size is out of reach of a CPU), the same
per-device batch (the lr is given per 256 images, so each recipe keeps its own scaling), on the
CPU. Everything else each recipe sets (optimiser, schedule, loss, EMA, augmentation, BlurPool,
test-time flip) is kept. It is a proxy and says so: the real table needs ImageNet and a GPU.

Then the train step time of ``--step-arch`` (default resnet50) at 160, 192 and 224 px on this
CPU: what progressive resizing saves per step.

Prints two markdown tables and writes ``--out``/time_to_accuracy.png; results with their machine
belong in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf  # noqa: E402

from trainer.config import load_config  # noqa: E402

RECIPES = ["rn50_90ep", "rn50_ffcv_16ep", "rn50_ffcv_24ep", "rn50_ffcv_88ep", "rn50_composer_mild", "rn50_mlperf_lars"]
EPOCH_KEYS = ["trainer.max_epochs", "optim.warmup_epochs", "optim.peak_epoch",
              "data.progressive.start_epoch", "data.progressive.end_epoch"]
PIXEL_KEYS = ["data.image_size", "data.val_image_size", "data.val_resize",
              "data.progressive.start_size", "data.progressive.end_size", "data.progressive.step"]


def scaled_overrides(recipe: str, epoch_scale: float, pixel_scale: float) -> list[str]:
    """``key=value`` overrides that shrink ``recipe``'s epochs and pixels by the two factors."""
    cfg = load_config([f"experiment={recipe}"])
    out = []
    for key in EPOCH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        scaled = value * epoch_scale
        # Whole epochs where the key is an int (at least 1 for the run's length), else a fraction.
        out.append(f"{key}={max(1, round(scaled)) if isinstance(value, int) else round(scaled, 3)}")
    milestones = OmegaConf.select(cfg, "optim.milestones", default=None)
    if cfg.optim.schedule == "step" and milestones:
        out.append("optim.milestones=[" + ",".join(str(max(1, round(m * epoch_scale))) for m in milestones) + "]")
    ramp = OmegaConf.select(cfg, "data.progressive.start_size", default=None) is not None
    for key in PIXEL_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and (ramp or not key.startswith("data.progressive.")):
            out.append(f"{key}={max(8, round(value * pixel_scale))}")
    return out


def train(recipe: str, overrides: list[str], root: Path, run_dir: Path, args) -> list[tuple[float, float]]:
    """Fit ``recipe`` with ``overrides``; (cumulative training seconds, val top-1) per epoch."""
    cmd = [
        sys.executable, "-m", "trainer", "fit", f"experiment={recipe}", *overrides,
        f"data.root={root}", "data.backend=dali_cpu", f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.threads}", f"model.arch={args.arch}", "model.num_classes=null",
        "model.channels_last=false", "model.compile=false", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.num_nodes=1", "trainer.precision=32-true", "logger.wandb.mode=disabled",
        f"run.dir={run_dir}", "run.resume=false", f"seed={args.seed}",
    ]
    print(" ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    seconds: dict[int, float] = {}
    top1: dict[int, float] = {}
    for row in rows:
        epoch = int(row["epoch"]) if row.get("epoch") else None
        if epoch is None:
            continue
        if row.get("perf/epoch_time_s"):
            seconds[epoch] = float(row["perf/epoch_time_s"])
        if row.get("val/top1"):
            top1[epoch] = float(row["val/top1"])
    curve, total = [], 0.0
    for epoch in sorted(top1):
        total += seconds.get(epoch, 0.0)
        curve.append((total, top1[epoch]))
    return curve


def step_times(arch: str, sizes: list[int], batch: int, steps: int) -> dict[int, float]:
    """Seconds per training step (forward, backward, SGD) of ``arch`` at each size, on this CPU."""
    import torch

    from trainer.recipe.models import build_model

    model = build_model(arch, 1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    out = {}
    for size in sizes:
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 1000, (batch,))
        for i in range(steps + 1):  # the first step warms up
            if i == 1:
                start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        out[size] = (time.perf_counter() - start) / steps
    return out


def reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds at the first epoch whose val top-1 reaches ``target``."""
    return next((t for t, acc in curve if acc >= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--baseline", default="rn50_90ep")
    parser.add_argument("--epoch-scale", type=float, default=0.1)
    parser.add_argument("--pixel-scale", type=float, default=0.25)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--step-arch", default="resnet50")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/time_to_accuracy"))
    args = parser.parse_args(argv)

    root = args.out / "data"
    if not (root / "train").is_dir():
        size = max(8, round(256 * args.pixel_scale))
        subprocess.run([sys.executable, "-m", "trainer", "sample-data", str(root), "--classes", str(args.classes),
                        "--train-per-class", str(args.train_per_class), "--val-per-class", str(args.val_per_class),
                        "--size", f"{size}x{size}"], check=True, stdout=subprocess.DEVNULL)
    curves = {}
    for recipe in args.recipes:
        overrides = scaled_overrides(recipe, args.epoch_scale, args.pixel_scale)
        curves[recipe] = (overrides, train(recipe, overrides, root, args.out / recipe, args))

    target = curves[args.baseline][1][-1][1] if args.baseline in curves else None
    print(f"\nsample data: {args.classes} classes x {args.train_per_class} train / {args.val_per_class} val images; "
          f"{args.arch}, batch {args.batch_size}, dali_cpu, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"epochs x{args.epoch_scale}, pixels x{args.pixel_scale}\n")
    print(f"| recipe | epochs | final val top-1 | training s | s to the baseline's final top-1 ({target:.3f}) |"
          if target is not None else "| recipe | epochs | final val top-1 | training s | - |")
    print("|---|---|---|---|---|")
    for recipe, (overrides, curve) in curves.items():
        hit = reach(curve, target) if target is not None else None
        print(f"| {recipe} | {len(curve)} | {curve[-1][1]:.3f} | {curve[-1][0]:.0f} | "
              f"{'not reached' if hit is None else f'{hit:.0f}'} |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for recipe, (_, curve) in curves.items():
            ax.plot([t for t, _ in curve], [a for _, a in curve], marker="o", label=recipe)
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", label=f"{args.baseline} final")
        ax.set_xlabel("training seconds (CPU proxy)")
        ax.set_ylabel("val top-1")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "time_to_accuracy.png", dpi=110)
    except ImportError:
        pass

    times = step_times(args.step_arch, [160, 192, 224], args.step_batch, args.steps)
    print(f"\n{args.step_arch} train step, batch {args.step_batch}, float32, this CPU ({torch_threads()} threads):\n")
    print("| size | s per step | x the 224 px step |\n|---|---|---|")
    for size, t in times.items():
        print(f"| {size} | {t:.2f} | {t / times[224]:.2f} |")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
