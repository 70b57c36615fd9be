"""Throughput of ``imagenet-trainer pack``: decode-check, then shard writing, then a re-run that
finds every shard finished (the cost of resuming: each kept shard is re-hashed).

    python bench/pack_throughput.py                          # 2000 ImageNet-like JPEGs, all cores
    python bench/pack_throughput.py --images 20000 --workers 16 --shard-size 256MB
    python bench/pack_throughput.py --root /data/imagenet --out /scratch/shards --workers 32

Without ``--root`` it writes ``--images`` train photos (tests/photos.py: 500x375 and
375x500, quality 90, about 80 KB, ImageNet's sizes) and a tenth as many val photos into a
temporary folder; the files are then in the page cache, so the check is CPU-bound (two decodes
per image) and the write is bound by the copy, the hashing and the fsyncs. On a real ImageNet
copy on a network filesystem the first read of each file sets the pace instead.

Prints a markdown table (results with their machine belong in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipelines import check  # noqa: E402
from data_pipelines.pack import pack, parse_size  # noqa: E402
from tests import photos  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageNet-layout tree (default: generate one)")
    parser.add_argument("--out", type=Path, help="where to pack (default: a temporary folder, removed)")
    parser.add_argument("--images", type=int, default=2000, help="train images to generate (default 2000)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="pack --workers (default: CPU cores available)")
    parser.add_argument("--shard-size", default="32MB", help="pack --shard-size (default 32MB: several shards "
                                                              "from a small tree)")
    args = parser.parse_args(argv)
    workers = check.default_workers() if args.workers is None else args.workers
    parse_size(args.shard_size)

    with tempfile.TemporaryDirectory(prefix="pack-bench-") as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "imagenet"
            start = time.perf_counter()
            photos.write_tree(root, "train", classes=args.classes, num_images=args.images, workers=workers)
            photos.write_tree(root, "val", classes=args.classes, num_images=max(1, args.images // 10), seed=1,
                              workers=workers)
            print(f"generated {args.images + max(1, args.images // 10)} JPEGs in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
        out = args.out or Path(tmp) / "shards"
        if args.out is None and out.exists():
            shutil.rmtree(out)

        rows = []
        for label in ("pack", "re-run (all kept)"):
            start = time.perf_counter()
            result = pack(root, out, shard_size=args.shard_size, workers=workers, skip_bad=True, progress=False)
            total = time.perf_counter() - start
            rows.append((label, result, total))

    print(f"| run | images | bytes | shards | workers | check s | write s | total s | images/s | MB/s | write MB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r, total in rows:
        images = sum(r.images.values())
        shards = sum(r.shards.values())
        write = f"{r.bytes / 1e6 / r.write_seconds:.0f}" if label == "pack" else f"(verify {r.write_seconds:.2f} s)"
        print(f"| {label} | {images} | {r.bytes / 1e6:.1f} MB | {shards} (kept {r.kept}) | {workers} | "
              f"{r.check_seconds:.2f} | {r.write_seconds:.2f} | {total:.2f} | {images / total:.0f} | "
              f"{r.bytes / 1e6 / total:.1f} | {write} |")


if __name__ == "__main__":
    main()
