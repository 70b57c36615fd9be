"""Images/s of ``imagenet-trainer prepare`` from the downloads (the official archives, Hugging Face's
tar.gz files) against ``pack`` of the extracted folder tree: the same images, workers and machine.

    python bench/prepare_speed.py                        # 2000 train + 200 val JPEGs of ~20-60 KB
    python bench/prepare_speed.py --images 20000 --workers 16 --rounds 3

It writes the tree (tests/photos.py's photo-like JPEGs, 320x240 and 240x320 at quality 90, named as
ImageNet's: ``<wnid>_<n>.JPEG``, ``ILSVRC2012_val_NNNNNNNN.JPEG``), builds the downloads from it
(tests/archives.py), then times each way into a fresh OUT, in turn, ``--rounds`` times; every file
is in the page cache, so this compares the CPU work (tar indexing, byte-range reads, the decode
check, the shard writing), not a disk. Each prepared pack is checked byte-identical to pack's.

Prints a markdown table (results with their machine belong in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipelines import check  # noqa: E402
from data_pipelines.pack import pack  # noqa: E402
from data_pipelines.prepare import prepare  # noqa: E402
from tests import archives, photos  # noqa: E402


def _tree(root: Path, images: int, classes: int, workers: int) -> None:
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    sizes = ((320, 240), (320, 240), (240, 320))
    for split, count, seed in (("train", images, 0), ("val", max(1, images // 10), 1)):
        paths = photos.write_tree(root, split, classes=wnids, num_images=count, sizes=sizes, seed=seed, workers=workers)
        for i, path in enumerate(paths):
            name = f"{path.parent.name}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            path.rename(path.with_name(name))
    (root / "synset_words.txt").write_text("".join(f"{w} class {w}\n" for w in wnids))


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*-*.*"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="train images (val: a tenth as many)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="--workers of both (default: CPU cores available)")
    parser.add_argument("--shard-size", default="16MB")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    workers = check.default_workers() if args.workers is None else args.workers

    with tempfile.TemporaryDirectory(prefix="prepare-bench-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        _tree(tmp / "tree", args.images, args.classes, workers)
        names = {w: f"class {w}" for w in sorted(os.listdir(tmp / "tree" / "train"))}
        official = archives.official(tmp / "tree", tmp / "official", names)
        hf = archives.hf_tars(tmp / "tree", tmp / "hf")
        total = sum(1 for _ in (tmp / "tree").rglob("*.JPEG"))
        size = sum(p.stat().st_size for p in (tmp / "tree").rglob("*.JPEG"))
        print(f"{total} JPEGs, {size / total / 1000:.0f} KB on average, made in {time.perf_counter() - start:.0f} s; "
              f"{workers} worker(s)", file=sys.stderr)

        ways = {
            "pack ROOT (extracted tree)": lambda out: pack(tmp / "tree", out, shard_size=args.shard_size,
                                                           workers=workers).ok,
            "prepare official archives": lambda out: prepare([official["train"], official["val"], official["devkit"]],
                                                             out, shard_size=args.shard_size, workers=workers,
                                                             say=lambda m: None).ok,
            "prepare HF tar.gz (spooled)": lambda out: prepare([*hf, tmp / "tree" / "synset_words.txt"], out,
                                                               shard_size=args.shard_size, workers=workers,
                                                               say=lambda m: None).ok,
        }
        seconds: dict[str, list[float]] = {w: [] for w in ways}
        reference = None
        for _ in range(args.rounds):
            for way, run in ways.items():
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                assert run(out), way
                seconds[way].append(time.perf_counter() - start)
                shards = _shards(out)
                reference = reference or shards
                assert shards == reference, f"{way}: shards differ from pack's"
        base = min(seconds["pack ROOT (extracted tree)"])
        print(f"| way | images | best s | images/s | time / pack's |")
        print("|---|---|---|---|---|")
        for way, times in seconds.items():
            best = min(times)
            print(f"| {way} | {total} | {best:.1f} | {total / best:.0f} | {best / base:.2f} |")


if __name__ == "__main__":
    main()
