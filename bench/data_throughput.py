"""Input-pipeline throughput on the CPU, like for like: dali_cpu against torchvision on the same
cores, producing the same output, and against the bound of a random-crop pipeline.

    python bench/data_throughput.py                      # generates 512 ImageNet-like JPEGs
    python bench/data_throughput.py --root /data/imagenet --images 4096 --threads 16
    python bench/data_throughput.py --stages             # CPU cost of each dali_cpu stage
    python bench/data_throughput.py --filelist-bench     # start-up cost of a 1.28M-line file list
    python bench/data_throughput.py --pack               # + the same images read from a pack of shards

Fairness: the benchmark pins itself (and so every DALI thread and every torchvision worker it
starts) to the same ``--threads`` CPU cores with ``sched_setaffinity``, and sets
``torch.set_num_threads`` in every process (``--threads`` in this one, 1 in each torchvision
worker, torch's DataLoader default). Inside that budget each backend runs as it does in
training: dali_cpu with ``num_threads`` DALI decode threads plus as many resize threads (the
resize of one batch overlaps the decode of the next; both share the pinned cores), torchvision
with ``num_workers`` worker processes (``--sweep`` also gives it twice as many).

Outputs compared: **uint8** (dali_cpu's batches as handed to a GPU, which normalises them;
torchvision with ``PILToTensor``) and **normalised float32** (dali_cpu normalised on this CPU, as
a CPU-only run does; torchvision with ``ToTensor`` + ``Normalize``). The bound is DALI's read +
random-crop ROI decode alone: a random-resized-crop pipeline decodes only the crop's region,
so full-image decode is not a ceiling. After one warm-up epoch each, the backends take turns,
one epoch at a time, for ``--rounds`` rounds; the table shows the best and the median round.
Prints a markdown table; results with their machine belong in bench/RESULTS.md.

``--pack``: files against tar shards. The same images are packed once (``data_pipelines.pack.pack``,
``--shard-size``, default 64MB, so that there are several shards) into a temporary folder beside
the tree, and the four loader rows (dali_cpu and torchvision, uint8 and float32) run again reading
the pack, on the same cores, with the same output and the same images per epoch. An epoch of the
file rows reads each of the ``--images`` files ``--repeat`` times; the pack holds each image
``--repeat`` times too (hard links under ``<stem>_r<k>`` in a link tree that is packed, plus one val
image per class, which ``pack`` needs), so that one epoch of the pack, read in its own order
(:mod:`data_pipelines.shards`: shards permuted, each shuffled within), feeds the same images the
same number of times. The shard rows read as training reads a pack: dali_cpu through
``DALILoader(PackSource(split))`` (``fn.readers.webdataset``, per-epoch index files written by
``shards.write_reader_indices``: part of each timed epoch), torchvision through
``PackSource.load`` (one ``pread`` per image at the index's offsets) in the pack's order. A second
table gives shards / files per backend. With ``--root`` the picked images' class folders are the
pack's classes (labels may be numbered differently; the images and their count are the same).
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

from data_pipelines import filelist, layout, shards  # noqa: E402
from tests import photos  # noqa: E402


def generate(root: Path, num_images: int, num_classes: int = 8, seed: int = 0) -> None:
    """``root/train/<class>/*.JPEG``: ImageNet-like photos (tests/photos.py), landscape
    500x375 and portrait 375x500, three to one, as in ImageNet; quality 90 (about 80 KB)."""
    photos.write_tree(root, "train", classes=num_classes, num_images=num_images, seed=seed)


# -- the timed backends ------------------------------------------------------------------------
BOUND = "DALI read + random-crop ROI decode (the bound)"
FULL_DECODE = "DALI read + full-image decode (for reference)"


def pin_cores(threads: int) -> list[int]:
    """Pin this process (and the threads and workers it starts) to ``threads`` of its CPUs."""
    cores = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else []
    if len(cores) < threads:
        sys.exit(f"--threads {threads}: only {len(cores)} CPUs are available to this process")
    os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(threads)
    return cores


def _rate(run_epoch) -> float:
    """Images per second of one epoch; ``run_epoch`` returns its image count."""
    start = time.perf_counter()
    images = run_epoch()
    return images / (time.perf_counter() - start)


def _cpu_ms(run_epoch) -> float:
    """Milliseconds of CPU (all of this process's threads) per image of one epoch."""
    start = time.process_time()
    images = run_epoch()
    return 1e3 * (time.process_time() - start) / images


def dali_decode_only(files, threads, batch, random_crop: bool, prefetch: int):
    """Read + decode and nothing else: with ``random_crop``, the region-of-interest decode that the
    training pipeline runs (same area and aspect ranges), which bounds it."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=prefetch)
    def decode(file_list):
        data, _ = fn.readers.file(files=file_list, pad_last_batch=True, name="Reader")
        if random_crop:
            return fn.decoders.image_random_crop(
                data, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0],
                random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=100,
            )
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
    from data_pipelines.dali import DALILoader, PipelineOptions

    options = PipelineOptions(device="cpu", num_threads=threads, prefetch=prefetch, output_device=output_device)
    loader = DALILoader(files, labels, train=True, batch_size=batch, seed=0, options=options)

    return _images_per_epoch(loader)


def _torchvision_transform(uint8: bool):
    from torchvision import transforms

    from data_pipelines.torchvision_loader import train_transform

    transform = train_transform(224)
    if uint8:
        transform = transforms.Compose([*transform.transforms[:2], transforms.PILToTensor()])
    return transform


def torchvision_loader(files, labels, workers, batch, *, uint8: bool):
    """Pillow decode + RandomResizedCrop(224) + flip in ``workers`` DataLoader worker processes,
    as the torchvision backend trains: to uint8 (``PILToTensor``) or to normalised float32
    (``ToTensor`` + ``Normalize``, the backend's own transform)."""
    import torch

    from data_pipelines.sources import FolderSource
    from data_pipelines.torchvision_loader import ImageFiles

    loader = torch.utils.data.DataLoader(
        ImageFiles(FolderSource(files, labels), _torchvision_transform(uint8)), batch_size=batch, shuffle=True,
        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
    )
    return _images_per_epoch(loader)


def torchvision_pack_loader(split: shards.ShardSplit, workers, batch, *, uint8: bool):
    """:func:`torchvision_loader` reading a pack's split as the torchvision backend does
    (``PackSource.load``: a ``pread`` at the index's offsets, tars kept open in each worker), in
    the pack's training order (``shards.train_ids``), a new epoch's order each epoch."""
    import torch

    from data_pipelines.sharding import EpochSampler
    from data_pipelines.sources import PackSource
    from data_pipelines.torchvision_loader import ImageFiles

    source = PackSource(split)
    sampler = EpochSampler(len(source), seed=0, shard_id=0, num_shards=1, batch_size=batch, order=source.train_ids)
    loader = torch.utils.data.DataLoader(
        ImageFiles(source, _torchvision_transform(uint8)), batch_size=batch, sampler=sampler,
        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
    )
    run = _images_per_epoch(loader)

    def epoch() -> int:
        n = run()
        sampler.set_epoch(sampler.epoch + 1)
        return n

    return epoch


def pack_images(files: list[str], repeat: int, work: Path, shard_size: str, workers: int) -> shards.ShardSplit:
    """Pack ``files``, each ``repeat`` times, into ``work/pack`` (through a tree of hard links,
    ``work/pack-src``); returns the pack's train split."""
    from data_pipelines.pack import pack

    src = work / "pack-src"

    def link(source: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:  # another filesystem
            import shutil

            shutil.copyfile(source, target)

    val_done: set[str] = set()
    for f in files:
        path = Path(f)
        for k in range(repeat):
            link(f, src / "train" / path.parent.name / f"{path.stem}_r{k}{path.suffix}")
        if path.parent.name not in val_done:  # pack needs val/: one image per class
            val_done.add(path.parent.name)
            link(f, src / "val" / path.parent.name / path.name)
    start = time.perf_counter()
    result = pack(src, work / "pack", shard_size=shard_size, workers=workers, progress=False)
    if not result.ok:
        sys.exit(f"pack: {len(result.bad)} bad images, e.g. {result.bad[0]}")
    split = shards.read_manifest(work / "pack").train
    print(f"packed {len(split)} train images into {len(split.shards)} shard(s) of at most {shard_size} "
          f"({result.bytes / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return split


def stages(files, labels, threads, batch, prefetch: int) -> list[tuple[str, float, float]]:
    """(stage, img/s, CPU ms per image) for each step the dali_cpu train loader adds, timed as a
    whole loader (best of 3 epochs each): the ROI decode alone, + the loader's resize and flip
    (uint8 handed over), + normalising on this CPU."""
    rows = [
        ("ROI decode alone (DALI read + image_random_crop)", dali_decode_only(files, threads, batch, True, prefetch)),
        ("+ resize and flip (the loader's uint8 batches)", dali_loader(files, labels, threads, batch, prefetch, None)),
        ("+ normalise on this CPU (float32 batches)", dali_loader(files, labels, threads, batch, prefetch)),
    ]
    out = []
    for name, run_epoch in rows:
        run_epoch()
        rates, cpu = [], []
        for _ in range(3):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            n = run_epoch()
            rates.append(n / (time.perf_counter() - start_wall))
            cpu.append(1e3 * (time.process_time() - start_cpu) / n)
        best = int(np.argmax(rates))
        out.append((name, rates[best], cpu[best]))
    return out


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
    parser.add_argument("--threads", type=int, default=2, help="CPU cores for every backend (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs per backend (default 5)")
    parser.add_argument("--prefetch", type=int, default=2, help="DALI prefetch queue depth")
    parser.add_argument(
        "--repeat", type=int, default=4,
        help="each epoch reads every image this many times (default 4): a DALI epoch starts a new "
        "pipeline, whose start-up a 16-batch epoch would overstate; ImageNet epochs are 600+ batches",
    )
    parser.add_argument("--sweep", action="store_true", help="also try other prefetch depths and worker counts")
    parser.add_argument("--stages", action="store_true", help="only time the dali_cpu stages (CPU ms per image)")
    parser.add_argument("--filelist-bench", action="store_true", help="only time a 1.28M-line file list")
    parser.add_argument("--pack", action="store_true",
                        help="also read the same images from a pack of tar shards (files vs shards)")
    parser.add_argument("--shard-size", default="64MB", help="--pack: shard size (default 64MB)")
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

    cores = pin_cores(args.threads)
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
        mean_kb = np.mean([os.path.getsize(f) for f in files]) / 1e3
        t, b, p = args.threads, args.batch_size, args.prefetch
        files, labels = files * args.repeat, labels * args.repeat
        setting = (
            f"{len(files) // args.repeat} JPEGs (mean {mean_kb:.0f} KB) read {args.repeat}x per epoch, batch {b}, "
            f"crop 224, pinned to CPU cores {cores} of {os.cpu_count()}"
        )

        if args.stages:
            print(f"\ndali_cpu train loader, stage by stage: {setting}; best of 3 epochs\n")
            print("| stage | img/s | CPU ms per image (all threads) |\n|---|---|---|")
            for name, rate, cpu in stages(files, labels, t, b, p):
                print(f"| {name} | {rate:.0f} | {cpu:.3f} |")
            return

        # (name, output, threads, run_epoch); the output names the like-for-like group.
        backends = [
            (BOUND, "crops", f"{t} DALI", dali_decode_only(files, t, b, True, p)),
            (FULL_DECODE, "images", f"{t} DALI", dali_decode_only(files, t, b, False, p)),
            (f"**dali_cpu** train loader, prefetch {p}", "uint8", f"{t} DALI + {t} resize",
             dali_loader(files, labels, t, b, p, output_device=None)),
            ("torchvision, PILToTensor", "uint8", f"{t} workers", torchvision_loader(files, labels, t, b, uint8=True)),
            (f"**dali_cpu** train loader, normalised on this CPU, prefetch {p}", "float32", f"{t} DALI + {t} resize",
             dali_loader(files, labels, t, b, p)),
            ("torchvision, ToTensor + Normalize", "float32", f"{t} workers",
             torchvision_loader(files, labels, t, b, uint8=False)),
        ]
        if args.sweep:
            for depth in sorted({1, 3, 4} - {p}):
                backends.append((f"dali_cpu train loader, prefetch {depth}", "uint8", f"{t} DALI + {t} resize",
                                 dali_loader(files, labels, t, b, depth, output_device=None)))
            backends.append(("torchvision, PILToTensor", "uint8", f"{2 * t} workers",
                             torchvision_loader(files, labels, 2 * t, b, uint8=True)))
            backends.append(("torchvision, ToTensor + Normalize", "float32", f"{2 * t} workers",
                             torchvision_loader(files, labels, 2 * t, b, uint8=False)))

        # Files or shards: which source each row reads (shards only with --pack).
        sources = ["files"] * len(backends)
        if args.pack:
            from data_pipelines.sources import PackSource

            split = pack_images(files[: len(files) // args.repeat], args.repeat, Path(tmp), args.shard_size, t)
            if len(split) != len(files):
                sys.exit(f"the pack holds {len(split)} train images, an epoch of files reads {len(files)}")
            backends += [
                (f"**dali_cpu** train loader, prefetch {p}, pack", "uint8", f"{t} DALI + {t} resize",
                 dali_loader(PackSource(split), None, t, b, p, output_device=None)),
                ("torchvision, PILToTensor, pack", "uint8", f"{t} workers",
                 torchvision_pack_loader(split, t, b, uint8=True)),
                (f"**dali_cpu** train loader, normalised on this CPU, prefetch {p}, pack", "float32",
                 f"{t} DALI + {t} resize", dali_loader(PackSource(split), None, t, b, p)),
                ("torchvision, ToTensor + Normalize, pack", "float32", f"{t} workers",
                 torchvision_pack_loader(split, t, b, uint8=False)),
            ]
            sources += ["shards"] * 4
            setting += f"; pack: {len(split.shards)} shards of at most {args.shard_size}"

        # One warm-up epoch each, then rounds that time every backend once, so that load from
        # other processes falls on all of them alike; the best round is the least disturbed.
        counts = [run_epoch() for *_, run_epoch in backends]
        if args.pack and len(set(counts[2:])) != 1:  # every loader row: the same images per epoch
            sys.exit(f"images per epoch differ between the loader rows: {counts}")
        rates: list[list[float]] = [[] for _ in backends]
        for _ in range(args.rounds):
            for i, (*_, run_epoch) in enumerate(backends):
                rates[i].append(_rate(run_epoch))

    bound = max(rates[0])
    # torchvision's best row per output (and source) is the baseline dali_cpu is compared with.
    baseline: dict[tuple[str, str], float] = {}
    for (name, output, _, _), source, r in zip(backends, sources, rates):
        if name.startswith("torchvision"):
            baseline[output, source] = max(baseline.get((output, source), 0.0), max(r))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{setting}; best and median of {args.rounds} interleaved epochs; load average {load:.2f} at the end\n")
    print(
        "| backend | output | threads | img/s (best) | img/s (median) | % of bound (best) | x torchvision, same output (best) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for (name, output, threads, _), source, r in zip(backends, sources, rates):
        key = (output, source)
        versus = f"{max(r) / baseline[key]:.2f}" if key in baseline else "-"
        print(
            f"| {name} | {output} | {threads} | {max(r):.0f} | {np.median(r):.0f} | {100 * max(r) / bound:.0f}% | {versus} |"
        )
    if args.pack:
        # Each pack row against the file row of the same backend and output (the same row order).
        files_rows = [(b, r) for b, s, r in zip(backends, sources, rates) if s == "files"][2:6]
        pack_rows = [(b, r) for b, s, r in zip(backends, sources, rates) if s == "shards"]
        print(f"\nfiles vs shards: the same {len(files)} images per epoch, same cores, same output\n")
        print("| backend | output | threads | files img/s (best) | shards img/s (best) | shards / files (best) | "
              "files img/s (median) | shards img/s (median) | shards / files (median) |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for ((name, output, threads, _), rf), (_, rs) in zip(files_rows, pack_rows):
            print(f"| {name} | {output} | {threads} | {max(rf):.0f} | {max(rs):.0f} | {max(rs) / max(rf):.2f} | "
                  f"{np.median(rf):.0f} | {np.median(rs):.0f} | {np.median(rs) / np.median(rf):.2f} |")


if __name__ == "__main__":
    main()
