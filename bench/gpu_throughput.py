"""ResNet training speed on one GPU, and where the time goes.

    python bench/gpu_throughput.py                       # on a GPU: ResNet-50, 256 images, bf16 (~4 min)
    python bench/gpu_throughput.py --rows synthetic,dali --steps 50
    python bench/gpu_throughput.py --device cpu --arch resnet18 --batch 4 --steps 3 --image-size 64

Rows (``--rows``, in this order by default; ``--budget-s`` skips what no longer fits):

    dali-alone          the DALI training pipeline alone (decode, random-resized crop, flip, normalise)
    synthetic           the model alone: one random batch kept on the device
    dali                the model fed by the DALI pipeline (on the GPU when there is one)
    lightning           our own ``fit`` (trainer.run: Classifier, callbacks, loggers) on the DALI data
    synthetic-compiled  torch.compile'd model (model.compile=true); dali-compiled likewise
    synthetic-nchw      without channels_last
    synthetic-fp16      16-mixed (GradScaler); synthetic-fp32: 32-true (TF32 matmuls and convs)
    synthetic-resnet101, synthetic-resnet152
    torchvision         the model fed by the torchvision loader (Pillow decoding in CPU workers)

Data: ``--jpegs`` generated ImageNet-size JPEGs (500x375 or 375x500, about 110 KB, quality 94;
tests/photos.py's photo-like images), hard-linked into a train/ tree as large as the timed
steps need, so that no epoch ends inside a timed window (the files are read from the page cache);
``--root`` uses an ImageNet-layout tree instead.

Timing (the device README's METHOD.md): ``--warmup`` steps first (cuDNN autotuning and compilation
happen there), then ``--repeats`` windows of ``--steps`` steps, each between two synchronisations of
the device; img/s is the median window and "spread" the range of the windows over it. CUDA events
recorded between forward, backward and the optimizer step split the steps; "gap" is the time the GPU
had no step to run (waiting for data or for the host). TFLOP/s counts the model's forward and
backward FLOPs (torch's FLOP counter); "% peak" compares them with a bf16 matmul timed here.
Results belong in bench/RESULTS.md with their card.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.module import param_groups, sgd_implementation  # noqa: E402
from trainer.recipe.models import build_model  # noqa: E402

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
PRECISION_NAMES = {"bf16-mixed": "bf16", "16-mixed": "fp16", "32-true": "fp32"}
GOAL_IMAGES_PER_SEC = 3000  # ResNet-50, bf16, DALI, per H100 (the issue's goal)
JPEG_QUALITY = 94  # about 110 KB at 500x375 for these photo-like images


# -- what is being measured ----------------------------------------------------------------------
@dataclass
class Row:
    name: str
    kind: str  # "train" | "pipeline" | "lightning"
    arch: str
    precision: str
    channels_last: bool = True
    compile: bool = False
    data: str = "synthetic"  # "synthetic" | "dali" | "torchvision"


@dataclass
class Result:
    row: Row
    images_per_sec: float | None = None
    ms_per_step: float | None = None
    spread_pct: float | None = None
    phases_ms: dict = field(default_factory=dict)  # forward, backward, optimizer, gap (per step)
    tflops: float | None = None
    mem_gib: float | None = None
    note: str = ""


def plan_rows(names: list[str], arch: str, precision: str) -> list[Row]:
    """The rows called ``names`` for the main ``arch`` and ``precision``."""
    table = {
        "dali-alone": Row("dali-alone", "pipeline", arch, precision, data="dali"),
        "synthetic": Row("synthetic", "train", arch, precision),
        "dali": Row("dali", "train", arch, precision, data="dali"),
        "lightning": Row("lightning", "lightning", arch, precision, data="dali"),
        "lightning-compiled": Row("lightning-compiled", "lightning", arch, precision, compile=True, data="dali"),
        "synthetic-compiled": Row("synthetic-compiled", "train", arch, precision, compile=True),
        "dali-compiled": Row("dali-compiled", "train", arch, precision, compile=True, data="dali"),
        "synthetic-nchw": Row("synthetic-nchw", "train", arch, precision, channels_last=False),
        "synthetic-fp16": Row("synthetic-fp16", "train", arch, "16-mixed"),
        "synthetic-bf16": Row("synthetic-bf16", "train", arch, "bf16-mixed"),
        "synthetic-fp32": Row("synthetic-fp32", "train", arch, "32-true"),
        "torchvision": Row("torchvision", "train", arch, precision, data="torchvision"),
    }
    rows = []
    for name in names:
        if name.startswith("synthetic-resnet") or name.startswith("synthetic-plain"):
            rows.append(Row(name, "train", name.split("-", 1)[1], precision))
        elif name in table:
            rows.append(table[name])
        else:
            raise SystemExit(f"--rows: unknown row {name!r}; choose from {', '.join(table)}, synthetic-resnetNN")
    return rows


GPU_ROWS = ("dali-alone,synthetic,dali,lightning,synthetic-compiled,dali-compiled,synthetic-nchw,"
            "synthetic-fp16,synthetic-fp32,synthetic-resnet101,synthetic-resnet152,torchvision")
CPU_ROWS = "dali-alone,synthetic,dali,lightning"


# -- clocks: CUDA events on a GPU, the host clock on the CPU ----------------------------------------
class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a, b) -> float:
        """Milliseconds from mark ``a`` to mark ``b`` (after a sync)."""
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


# -- the environment, for the record ------------------------------------------------------------------
def dali_status() -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        import nvidia.dali
        from nvidia.dali.plugin import pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any failure means "no DALI rows"
        return False, f"not importable: {err!r}"[:200]
    return True, nvidia.dali.__version__


def environment(device: torch.device) -> dict:
    import pytorch_lightning

    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "host_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "lightning": pytorch_lightning.__version__,
        "dali": dali_status()[1],
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
    return env


def matmul_tflops(device: torch.device) -> float | None:
    """bf16 matrix-product rate on random data (METHOD.md: measure the ceiling, don't quote it)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


_FLOPS: dict[tuple[str, int], float] = {}


def flops_per_image(arch: str, image_size: int) -> float:
    """Forward + backward FLOPs of one image, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (arch, image_size)
    if key not in _FLOPS:
        with torch.device("meta"):
            model = build_model(arch, 1000)
            x = torch.randn(2, 3, image_size, image_size)
        with FlopCounterMode(display=False) as counter:
            model(x).sum().backward()
        _FLOPS[key] = counter.get_total_flops() / 2
    return _FLOPS[key]


# -- data ------------------------------------------------------------------------------------------
def make_tree(root: Path, *, unique: int, total: int, classes: int = 8, workers: int = 1) -> Path:
    """``root/train/<class>/*.JPEG``: ``unique`` generated photos (tests/photos.py; a
    quarter of them portrait) hard-linked up to ``total`` files, and a small ``root/val`` (the
    DataModule wants one). Returns ``root``. With ``workers`` > 1 the photos are written by forked
    processes: call it before CUDA starts (see main)."""
    from tests import photos

    photos.write_tree(root, "train", classes=classes, num_images=total, unique=unique,
                      sizes=photos.IMAGENET_SIZES, quality=JPEG_QUALITY, workers=workers)
    photos.write_tree(root, "val", classes=classes, per_class=1, unique=1, seed=1, quality=JPEG_QUALITY)
    return root


def train_files(root: Path) -> tuple[list[str], list[int]]:
    from data_pipelines import layout

    split = layout.scan_split(root, "train")
    return list(split.files), list(split.labels)


def input_dtype(precision: str) -> str:
    from trainer.run import input_dtype as dtype_for

    return dtype_for(precision)


def synthetic_batches(batch: int, image_size: int, device: torch.device):
    """One random batch on the device, forever (random, not zeros: METHOD.md)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    while True:
        yield images, labels


def dali_loader(args, device: torch.device, files, labels, dtype: str, channels_last: bool):
    from data_pipelines.dali import DALILoader, PipelineOptions

    on_gpu = device.type == "cuda"
    options = PipelineOptions(
        image_size=args.image_size, val_resize=args.image_size, device="gpu" if on_gpu else "cpu",
        device_id=(device.index or 0) if on_gpu else None, num_threads=args.threads, dtype=dtype,
        channels_last=channels_last,  # as the DataModule of a fit gives it: no layout copy per step
    )
    return DALILoader(files, labels, train=True, batch_size=args.batch, seed=0, options=options)


def endless(loader, device: torch.device):
    """Batches of ``loader`` on ``device``, epoch after epoch."""
    while True:
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# -- one training step ---------------------------------------------------------------------------------
class Trainee:
    """A model, its SGD (fused on a GPU) and one training step whose phases can be marked."""

    def __init__(self, row: Row, device: torch.device, batch: int) -> None:
        self.model = build_model(row.arch, 1000, channels_last=row.channels_last).to(device)
        self.optimizer = torch.optim.SGD(
            param_groups(self.model, 3.0517578125e-05), lr=0.256 * batch / 256, momentum=0.875,
            **sgd_implementation(self.model.parameters()),
        )
        self.net = torch.compile(self.model) if row.compile else self.model
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.dtype = AUTOCAST.get(row.precision)
        self.scaler = torch.amp.GradScaler(device.type) if row.precision == "16-mixed" else None
        self.channels_last = row.channels_last
        self.device_type = device.type

    def step(self, images: torch.Tensor, labels: torch.Tensor, clock: Clock, marks: list | None) -> None:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            loss = self.criterion(self.net(images), labels)
        if marks is not None:
            marks.append(clock.mark())
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if marks is not None:
            marks.append(clock.mark())
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if marks is not None:
            marks.append(clock.mark())


def time_windows(step, batches, clock: Clock, *, warmup: int, steps: int, repeats: int) -> tuple[list[float], dict]:
    """Seconds of each of ``repeats`` windows of ``steps`` steps, and the mean phase times (ms per
    step) over all windows. ``step(images, labels, marks)`` appends 3 marks to ``marks``."""
    for _ in range(warmup):
        images, labels = next(batches)
        step(images, labels, None)
    clock.sync()
    windows, all_marks = [], []
    for _ in range(repeats):
        marks_window = []
        start = time.perf_counter()
        for _ in range(steps):
            images, labels = next(batches)
            marks = [clock.mark()]
            step(images, labels, marks)
            marks_window.append(marks)
        clock.sync()
        windows.append(time.perf_counter() - start)
        all_marks.append(marks_window)
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "gap": 0.0}
    n = steps * repeats
    for marks_window in all_marks:
        for i, (m0, m1, m2, m3) in enumerate(marks_window):
            phases["forward"] += clock.ms(m0, m1) / n
            phases["backward"] += clock.ms(m1, m2) / n
            phases["optimizer"] += clock.ms(m2, m3) / n
            if i + 1 < len(marks_window):
                phases["gap"] += clock.ms(m3, marks_window[i + 1][0]) / max(1, n - repeats)
    return windows, phases


def summarise(result: Result, windows: list[float], batch: int, steps: int) -> None:
    rates = [batch * steps / w for w in windows]
    median = statistics.median(rates)
    result.images_per_sec = median
    result.ms_per_step = 1e3 * batch / median
    result.spread_pct = 100 * (max(rates) - min(rates)) / median


# -- the rows -----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.clock = Clock(device)
        self.trainees: dict[tuple, Trainee] = {}
        self.dali_ok, self.dali_why = dali_status()
        self._tree: Path | None = Path(args.root) if args.root else None
        self._tmp = tempfile.TemporaryDirectory(prefix="gpu_throughput_")

    @property
    def timed_steps(self) -> int:
        return self.args.warmup + self.args.steps * self.args.repeats

    def tree(self) -> Path:
        if self._tree is None:
            need = (self.timed_steps + 4) * self.args.batch  # one epoch covers every timed step
            t0 = time.perf_counter()
            self._tree = make_tree(Path(self._tmp.name) / "jpegs", unique=self.args.jpegs, total=need,
                                   workers=min(16, os.cpu_count() or 1))
            print(f"  generated {min(self.args.jpegs, need)} JPEGs, linked to {need} files, in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        return self._tree

    def trainee(self, row: Row) -> Trainee:
        key = (row.arch, row.precision, row.channels_last, row.compile)
        if key not in self.trainees:
            if len(self.trainees) >= 2:  # keep the last model (the compiled one for dali-compiled)
                self.trainees.pop(next(iter(self.trainees)))
            self.trainees[key] = Trainee(row, self.device, self.args.batch)
        return self.trainees[key]

    def run(self, row: Row) -> Result:
        result = Result(row)
        if row.data == "dali" and not self.dali_ok:
            if row.kind == "lightning":
                row.data = "torchvision"
                result.note = "DALI missing: the torchvision backend instead. "
            else:
                result.note = f"skipped: DALI {self.dali_why}"
                return result
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        getattr(self, f"_{row.kind}")(row, result)
        if self.device.type == "cuda":
            result.mem_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        return result

    def _train(self, row: Row, result: Result) -> None:
        a = self.args
        trainee = self.trainee(row)
        loader = None
        if row.data == "synthetic":
            batches = synthetic_batches(a.batch, a.image_size, self.device)
        else:
            files, labels = train_files(self.tree())
            if row.data == "dali":
                loader = dali_loader(a, self.device, files, labels, input_dtype(row.precision), row.channels_last)
            else:
                from data_pipelines.torchvision_loader import build_train_loader

                loader = build_train_loader(files, labels, batch_size=a.batch, image_size=a.image_size,
                                            num_workers=a.threads, seed=0, shard_id=0, num_shards=1)
            batches = endless(loader, self.device)

        def step(images, labels, marks):
            trainee.step(images, labels, self.clock, marks)

        try:
            windows, phases = time_windows(step, batches, self.clock, warmup=a.warmup, steps=a.steps,
                                           repeats=a.repeats)
        finally:
            batches.close()
            if loader is not None and hasattr(loader, "release"):
                loader.release()
        summarise(result, windows, a.batch, a.steps)
        result.phases_ms = phases
        result.tflops = flops_per_image(row.arch, a.image_size) * result.images_per_sec / 1e12

    def _pipeline(self, row: Row, result: Result) -> None:
        a = self.args
        files, labels = train_files(self.tree())
        loader = dali_loader(a, self.device, files, labels, input_dtype(row.precision), row.channels_last)
        batches = iter(loader)
        try:
            for _ in range(a.warmup):
                next(batches)
            windows = []
            for _ in range(a.repeats):
                self.clock.sync()
                start = time.perf_counter()
                for _ in range(a.steps):
                    next(batches)
                self.clock.sync()
                windows.append(time.perf_counter() - start)
        finally:
            batches.close()
            loader.release()
        summarise(result, windows, a.batch, a.steps)
        result.note += f"{a.threads} CPU threads; output {input_dtype(row.precision)}"

    def _lightning(self, row: Row, result: Result) -> None:
        """Our own fit: the config, DataModule, Classifier and Trainer of trainer.run."""
        import pytorch_lightning as pl

        from trainer.config import load_config
        from trainer.run import build_datamodule, build_module, build_trainer

        a = self.args
        gpu = self.device.type == "cuda"
        backend = {"dali": "dali_gpu" if gpu else "dali_cpu", "torchvision": "torchvision"}[row.data]
        run_dir = Path(self._tmp.name) / f"run_{row.name}"
        cfg = load_config([
            f"data.root={self.tree()}", f"data.backend={backend}", f"data.batch_size={a.batch}",
            f"data.image_size={a.image_size}", f"data.val_resize={a.image_size}", f"data.num_workers={a.threads}",
            "data.filelist_cache=false", f"model.arch={row.arch}", "model.num_classes=1000",
            f"model.channels_last={str(row.channels_last).lower()}", f"model.compile={str(row.compile).lower()}",
            f"trainer.precision={row.precision}", f"trainer.accelerator={'gpu' if gpu else 'cpu'}",
            "trainer.devices=1", "trainer.max_epochs=1", f"trainer.limit_train_batches={self.timed_steps}",
            "trainer.limit_val_batches=0", "logger.wandb.mode=disabled", f"run.dir={run_dir}",
        ])
        timer = WindowTimer(a.warmup, a.steps, a.repeats, self.clock.sync)
        # Lightning's own lines (and PlainProgress's) go to stderr, out of the table.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            dm = build_datamodule(cfg)
            module = build_module(cfg, dm.classes)
            trainer = build_trainer(cfg, run_dir, for_fit=True)
            trainer.callbacks.append(timer)
            trainer.fit(module, datamodule=dm)
        if len(timer.windows) < a.repeats:
            raise RuntimeError(f"the fit ran {trainer.global_step} steps, fewer than the {self.timed_steps} timed")
        summarise(result, timer.windows, a.batch, a.steps)
        result.tflops = flops_per_image(row.arch, a.image_size) * result.images_per_sec / 1e12
        dtype = input_dtype(row.precision) if gpu else "float32"  # the DataModule's (ImageNetDataModule.gpu_dtype)
        result.note += f"data.backend={backend}, data dtype {dtype}, all callbacks and loggers"


class WindowTimer(pl.Callback):
    """Times ``repeats`` windows of ``steps`` training steps after ``warmup``, synchronising the
    device at the window edges only. Whole loop iterations are timed, from the end of one step to
    the end of another: fetching, logging and every callback included."""

    def __init__(self, warmup: int, steps: int, repeats: int, sync) -> None:
        self.warmup, self.steps, self.repeats, self.sync = warmup, steps, repeats, sync
        self.marks: list[float] = []

    @property
    def windows(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = batch_idx + 1 - self.warmup
        if done >= 0 and done % self.steps == 0 and done // self.steps <= self.repeats:
            self.sync()
            self.marks.append(time.perf_counter())


# -- the table ---------------------------------------------------------------------------------------
def _f(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table(results: list[Result], peak: float | None) -> str:
    head = ("| row | model | data | precision | layout | mode | img/s | ms/step | spread | forward | backward "
            "| optimizer | gap | TFLOP/s | % peak | GPU mem GiB | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        row = r.row
        ph = r.phases_ms
        pct = 100 * r.tflops / peak if (peak and r.tflops) else None
        model = "-" if row.kind == "pipeline" else row.arch
        layout = "-" if row.kind == "pipeline" else ("NHWC" if row.channels_last else "NCHW")
        mode = "-" if row.kind == "pipeline" else ("compiled" if row.compile else "eager")
        if row.kind == "lightning":
            mode += ", Lightning fit"
        lines.append(
            f"| {row.name} | {model} | {row.data} | {PRECISION_NAMES.get(row.precision, row.precision)} | {layout} "
            f"| {mode} | {_f(r.images_per_sec, ',.0f')} | {_f(r.ms_per_step, '.1f')} "
            f"| {'' if r.spread_pct is None else f'{r.spread_pct:.1f}%'} "
            f"| {_f(ph.get('forward'), '.1f')} | {_f(ph.get('backward'), '.1f')} | {_f(ph.get('optimizer'), '.1f')} "
            f"| {_f(ph.get('gap'), '.1f')} | {_f(r.tflops, '.3g')} | {_f(pct, '.0f')} | {_f(r.mem_gib, '.1f')} "
            f"| {r.note} |"
        )
    return "\n".join(lines)


def goal_line(results: list[Result]) -> str:
    best = [r for r in results if r.row.data == "dali" and r.row.arch == "resnet50" and r.images_per_sec
            and r.row.precision == "bf16-mixed"]
    if not best:
        return f"Goal ({GOAL_IMAGES_PER_SEC:,} img/s, ResNet-50 bf16 with DALI): not measured in this run."
    top = max(best, key=lambda r: r.images_per_sec)
    verdict = "met" if top.images_per_sec >= GOAL_IMAGES_PER_SEC else "NOT met"
    return (f"Goal ({GOAL_IMAGES_PER_SEC:,} img/s per GPU, ResNet-50 bf16 with DALI): {verdict}: "
            f"{top.images_per_sec:,.0f} img/s in row {top.row.name}.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu; another GPU: CUDA_VISIBLE_DEVICES")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256, help="images per step (per GPU)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", default=None, choices=sorted(PRECISION_NAMES),
                   help="default bf16-mixed on a GPU, 32-true on the CPU (CPU bf16 is emulated: slow)")
    p.add_argument("--rows", default=None, help=f"comma-separated; default on a GPU: {GPU_ROWS}; on the CPU: {CPU_ROWS}")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 on a GPU, 2 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="DALI threads / DataLoader workers (default min(8, CPUs))")
    p.add_argument("--jpegs", type=int, default=1024, help="distinct JPEGs to generate (the tree links them)")
    p.add_argument("--root", default=None, help="an ImageNet-layout tree to read instead of generated JPEGs")
    p.add_argument("--budget-s", type=float, default=None, help="skip the rows that start after this many seconds")
    p.add_argument("--out", default=None, help="write OUT.md and OUT.json too")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.rows = (args.rows or (GPU_ROWS if gpu else CPU_ROWS)).split(",")
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    args.threads = args.threads or min(8, os.cpu_count() or 1)
    return args


def parse_device(name: str) -> torch.device:
    """``--device`` (auto, cpu, cuda or cuda:0) -> a torch.device. A CUDA device always carries its
    index: ``torch.cuda.set_device`` and the memory statistics refuse a bare ``cuda``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}, but CUDA is not available here: use --device cpu")
        if device.index not in (None, 0):
            # The Lightning rows train on trainer.devices=1, i.e. GPU 0, and set it as the current
            # device: another index would time two GPUs in one table.
            raise SystemExit(f"--device {name}: choose the GPU with CUDA_VISIBLE_DEVICES={device.index} and --device cuda")
        # Not torch.cuda.current_device(): it would start CUDA before the JPEG writers are forked.
        device = torch.device("cuda", 0)
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    device = parse_device(args.device)
    if device.type == "cpu":  # the data threads and the model's share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.threads))
    if device.type == "cuda":
        # What trainer.run.use_fast_gpu_math does for a fit on a GPU.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    header = ""
    results: list[Result] = []

    def report(final: bool) -> str:
        """The table so far; written to --out after every row, so that a run cut short keeps it."""
        text = f"{header}\n\n{table(results, peak)}\n\n{goal_line(results)}\n"
        if not final:
            text += "(partial: the run did not finish)\n"
        if args.out:
            Path(args.out + ".md").write_text(text)
            rows = [{**asdict(r.row), **{k: v for k, v in asdict(r).items() if k != "row"}} for r in results]
            Path(args.out + ".json").write_text(json.dumps({"env": env, "rows": rows, "final": final}, indent=1) + "\n")
        return text

    bench = Bench(args, device)
    if any(r.data != "synthetic" for r in plan_rows(args.rows, args.arch, args.precision)):
        bench.tree()  # before CUDA starts: the JPEGs are written by forked processes
    env = environment(device)
    env.update(batch=args.batch, image_size=args.image_size, warmup=args.warmup, steps=args.steps,
               repeats=args.repeats, threads=args.threads)
    print("  " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    peak = matmul_tflops(device)
    env["bf16_matmul_tflops"] = None if peak is None else round(peak)
    header = (f"{env['date']}: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
              f"Lightning {env['lightning']}, DALI {env['dali']}; batch {args.batch}, {args.image_size}px, "
              f"{args.repeats} windows of {args.steps} steps after {args.warmup} warm-up; "
              f"bf16 matmul {_f(peak, '.0f') or 'n/a'} TFLOP/s")
    start = time.perf_counter()
    for row in plan_rows(args.rows, args.arch, args.precision):
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            results.append(Result(row, note=f"skipped: past the {args.budget_s:.0f} s budget"))
            continue
        t0 = time.perf_counter()
        try:
            result = bench.run(row)
        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            result = Result(row, note=f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print(f"  {row.name}: {_f(result.images_per_sec, ',.0f') or '-'} img/s "
              f"({time.perf_counter() - t0:.0f} s) {result.note}", flush=True)
        report(final=False)

    print("\n" + report(final=True), flush=True)
    return 0 if all(not r.note.startswith("FAILED") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
