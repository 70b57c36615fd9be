"""Input-pipeline throughput on the CPU: DALI decode ceiling, DALI training pipeline, torchvision.

    python bench/data_throughput.py                      # generates 512 ImageNet-like JPEGs
    python bench/data_throughput.py --root /data/imagenet --images 4096 --threads 16
    python bench/data_throughput.py --filelist-bench     # start-up cost of a 1.28M-line file list

Every backend gets the same number of CPU threads (DALI ``num_threads``, torchvision
``num_workers``) and the same images. (dali_cpu resizes in a pool of ``num_threads`` threads of
its own, which runs while DALI's threads wait for it: never more than ``num_threads`` busy.)
dali_cpu is timed twice: handing over uint8 batches (what a GPU run costs the CPU: the GPU
normalises) and normalised on this CPU (what a CPU-only run costs; the normalisation runs in
the consuming thread, as it would in training). After one warm-up epoch each, the backends take turns, one
epoch at a time, for ``--rounds`` rounds; the table shows the best and the median round. Prints a
markdown table; results with their machine belong in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipelines import filelist, layout  # noqa: E402


def photo(rng: np.random.Generator, width: int, height: int):
    """A photo-like image: smooth colour fields, mid-frequency texture and sensor-like noise, so
    that JPEG sizes (about 80 KB at 500x375, quality 90) and decode cost resemble ImageNet's."""
    from PIL import Image

    small = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
    texture = rng.integers(0, 256, (height // 3, width // 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((width, height), Image.BILINEAR), np.float32)
    pixels += (texture[..., None] - 128) * 0.4 + rng.normal(0, 9, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def generate(root: Path, num_images: int, num_classes: int = 8, seed: int = 0) -> None:
    """``root/train/<class>/*.JPEG``: landscape 500x375 and portrait 375x500, as in ImageNet."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = root / "train" / f"n{i % num_classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        photo(rng, *size).save(folder / f"img_{i:06d}.JPEG", quality=90)


# -- the timed backends ------------------------------------------------------------------------
CEILING = "DALI read + full decode (ceiling)"
TORCHVISION = "torchvision ImageFolder + DataLoader"

def _rate(run_epoch) -> float:
    """Images per second of one epoch; ``run_epoch`` returns its image count."""
    start = time.perf_counter()
    images = run_epoch()
    return images / (time.perf_counter() - start)


def dali_decode_only(files, threads, batch, random_crop: bool, prefetch: int):
    """Read + decode and nothing else: the ceiling for a CPU DALI pipeline."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=prefetch)
    def decode(file_list):
        data, _ = fn.readers.file(files=file_list, pad_last_batch=True, name="Reader")
        if random_crop:
            return fn.decoders.image_random_crop(data, device="cpu", output_type=types.RGB)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    return _pipeline_epochs(decode, files, batch)


def _pipeline_epochs(pipeline, files, batch):
    """Epochs of a bare DALI ``pipeline(file_list)``: a new shuffled list and pipeline each
    epoch, as the training loader does; returns the function that runs one."""
    usable = files[: len(files) // batch * batch]
    seed = iter(range(10**6))

    def epoch() -> int:
        order = np.random.default_rng(next(seed)).permutation(len(usable))
        pipe = pipeline([usable[i] for i in order])
        pipe.build()
        for _ in range(len(usable) // batch):
            pipe.run()
        pipe._shutdown()  # noqa: SLF001
        return len(usable)

    return epoch


def _images_per_epoch(loader):
    """One epoch of ``loader`` as a function returning the number of images it fed."""

    def epoch() -> int:
        n = 0
        for images, _ in loader:
            n += images.shape[0]
        return n

    return epoch


def dali_loader(files, labels, threads, batch, prefetch: int, output_device: str | None = "cpu"):
    """The training loader as it runs in training (per-epoch rebuild included). ``output_device``
    "cpu": batches normalised on this CPU, as when training on the CPU; ``None``: the uint8
    batches the pipeline hands over, which a GPU run normalises on the GPU."""
    from data_pipelines.dali import DALILoader

    loader = DALILoader(
        files, labels, train=True, batch_size=batch, image_size=224, seed=0,
        device="cpu", device_id=None, num_threads=threads, prefetch=prefetch, output_device=output_device,
    )

    return _images_per_epoch(loader)


def dali_resize_pipeline(files, threads, batch, prefetch: int):
    """The previous dali_cpu train pipeline, for comparison: ROI decode, DALI's own CPU resize
    (antialiased linear), crop_mirror_normalize to float32 CHW with a random flip."""
    from nvidia.dali import fn, pipeline_def, types

    from data_pipelines import IMAGENET_MEAN, IMAGENET_STD

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=prefetch)
    def train(file_list):
        data, _ = fn.readers.file(files=file_list, pad_last_batch=True, name="Reader")
        images = fn.decoders.image_random_crop(
            data, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3]
        )
        images = fn.resize(images, resize_x=224, resize_y=224, interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.crop_mirror_normalize(
            images, mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD],
            mirror=fn.random.coin_flip(probability=0.5), output_layout="CHW", dtype=types.FLOAT,
        )

    return _pipeline_epochs(train, files, batch)


def torchvision_loader(root: Path, threads, batch, repeat: int = 1):
    """ImageFolder + RandomResizedCrop(224) + flip + ToTensor + Normalize, ``threads`` workers."""
    import torch
    from torchvision import datasets

    from data_pipelines.torchvision_loader import train_transform

    dataset = datasets.ImageFolder(str(root / "train"), train_transform(224))
    dataset = torch.utils.data.ConcatDataset([dataset] * repeat)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=threads, drop_last=True,
        persistent_workers=threads > 0,
    )

    return _images_per_epoch(loader)


# -- file list start-up ------------------------------------------------------------------------
def filelist_bench(num_lines: int = 1_281_167, num_classes: int = 1000) -> dict[str, float]:
    """Seconds for the start-up path of :func:`filelist.cached_split` on an ImageNet-sized list:
    1,000 (empty) class folders to stat, and a generated 1.28M-line cache to read back."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imagenet"
        classes = [f"n{c:08d}" for c in range(num_classes)]
        past = time.time() - 60
        for c in classes:
            (root / "train" / c).mkdir(parents=True)
            os.utime(root / "train" / c, (past, past))
        os.utime(root / "train", (past, past))
        split_dir = root / "train"
        files, labels = [], []
        for i in range(num_lines):
            c = i % num_classes
            files.append(f"{split_dir}/{classes[c]}/{classes[c]}_{i}.JPEG")
            labels.append(c)
        split = layout.Split(root=split_dir, classes=classes, files=files, labels=labels)
        cache = Path(tmp) / "cache"
        start = time.perf_counter()
        path = filelist.cache_path(root, "train", cache_dir=cache)
        keyed = time.perf_counter()
        filelist.write_file_list(split, path)
        written = time.perf_counter()
        again = filelist.cached_split(root, "train", cache_dir=cache)
        read = time.perf_counter()
        assert again == split
        return {
            "lines": num_lines,
            "MB": path.stat().st_size / 1e6,
            "key_s": keyed - start,
            "write_s": written - keyed,
            "read_s": read - written,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageNet-layout tree (default: generate one)")
    parser.add_argument("--images", type=int, default=512, help="images to use (default 512)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per backend (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per backend (default 5)")
    parser.add_argument("--prefetch", type=int, default=2, help="DALI prefetch queue depth")
    parser.add_argument(
        "--repeat", type=int, default=4,
        help="each epoch reads every image this many times (default 4): a DALI epoch starts a new "
        "pipeline, whose start-up a 16-batch epoch would overstate; ImageNet epochs are 600+ batches",
    )
    parser.add_argument("--sweep", action="store_true", help="also try other DALI settings")
    parser.add_argument("--filelist-bench", action="store_true", help="only time a 1.28M-line file list")
    args = parser.parse_args(argv)

    if args.filelist_bench:
        r = filelist_bench()
        print("| file list | lines | size | cache key (1,000 stats) | write | cached_split (start-up) |")
        print("|---|---|---|---|---|---|")
        print(
            f"| generated | {r['lines']:,} | {r['MB']:.1f} MB | {r['key_s']:.3f} s | "
            f"{r['write_s']:.2f} s | {r['read_s']:.2f} s |"
        )
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "imagenet"
            start = time.perf_counter()
            generate(root, args.images)
            print(f"generated {args.images} JPEGs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        split = filelist.cached_split(root, "train") if args.root else layout.scan_split(root, "train")
        pick = np.sort(np.random.default_rng(0).permutation(len(split))[: args.images])
        files = [split.files[i] for i in pick]
        labels = [split.labels[i] for i in pick]
        if args.root is not None:  # ImageFolder would list the whole tree: give it the subset
            root = Path(tmp) / "subset"
            for f in files:
                link = root / "train" / Path(f).parent.name / Path(f).name
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.abspath(f), link)
        mean_kb = np.mean([os.path.getsize(f) for f in files]) / 1e3
        t, b, p = args.threads, args.batch_size, args.prefetch
        files, labels = files * args.repeat, labels * args.repeat

        backends = {
            CEILING: dali_decode_only(files, t, b, False, p),
            "DALI read + random-crop ROI decode": dali_decode_only(files, t, b, True, p),
            f"**dali_cpu** train loader, uint8 handed over (a GPU normalises), prefetch {p}": dali_loader(
                files, labels, t, b, p, output_device=None
            ),
            f"**dali_cpu** train loader, normalised on this CPU, prefetch {p}": dali_loader(files, labels, t, b, p),
        }
        if args.sweep:
            for depth in sorted({1, 3, 4} - {p}):
                backends[f"dali_cpu train loader, uint8 handed over, prefetch {depth}"] = dali_loader(
                    files, labels, t, b, depth, output_device=None
                )
            backends["previous dali_cpu pipeline: DALI's CPU resize + normalise"] = dali_resize_pipeline(files, t, b, p)
        backends[TORCHVISION] = torchvision_loader(root, t, b, args.repeat)

        # One warm-up epoch each, then rounds that time every backend once, so that load from
        # other processes falls on all of them alike; the best round is the least disturbed.
        for run_epoch in backends.values():
            run_epoch()
        rates: dict[str, list[float]] = {name: [] for name in backends}
        for _ in range(args.rounds):
            for name, run_epoch in backends.items():
                rates[name].append(_rate(run_epoch))

    ceiling, baseline = max(rates[CEILING]), max(rates[TORCHVISION])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{len(files) // args.repeat} JPEGs (mean {mean_kb:.0f} KB) read {args.repeat}x per epoch, "
        f"batch {b}, crop 224, best and median of "
        f"{args.rounds} interleaved epochs; {os.cpu_count()} CPUs, load average {load:.2f} at the end\n"
    )
    print(
        "| backend | threads | img/s (best) | img/s (median) | % of ceiling (best) | x torchvision (best) |\n"
        "|---|---|---|---|---|---|"
    )
    for name, r in rates.items():
        print(
            f"| {name} | {t} | {max(r):.0f} | {np.median(r):.0f} | {100 * max(r) / ceiling:.0f}% | "
            f"{max(r) / baseline:.2f} |"
        )

if __name__ == "__main__":
    main()
