"""Start-up time: from process start to the first training batch, on an ImageNet-sized file list.

    python bench/startup.py                       # 1 and 8 processes, 3 rounds each
    python bench/startup.py --procs 1 8 64 --rounds 5 --threads 4

Each process is started as rank r of N (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, one shared
cache folder), all N together, and runs what a training rank runs before its first step:
imports, ``ImageNetDataModule.splits`` (the file-list cache: 1,000 class-folder stats per split,
then a 1,281,167-line train list and a 50,000-line val list read back), the dali_cpu training
loader over its shard, and its first batch (normalised on this CPU, as a CPU run does).

This bench **generates the listing, not the files**: 1,000 empty class folders per split, the
cache files written as a listing of them would be, and real JPEGs (500x375, hard links to 16
generated ones) only under the names that the first few batches of each rank read. DALI's file
reader opens a file when it reads it, not when the pipeline is built (checked with strace: a
160k-file shard opens nothing beyond the batches read), so the other 1.27M names need not exist.
What this leaves out: listing the tree on a cold cache (done once per job, by one process), and
reading the list from a shared filesystem instead of this machine's page cache.

Seconds are wall time from just before the process is started to its first batch, as the
launcher sees them, split into imports, file lists (``splits``) and loader + first batch; and the
CPU seconds the process used by then (all its threads), which is what one rank costs when it has
cores of its own. Prints a markdown table (median and max over every process of every round);
results with their machine belong in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMAGE_SIZE, VAL_RESIZE, SEED = 224, 256, 0
BATCHES_WITH_FILES = 6  # first batch, DALI's prefetch (2) and its reader's read-ahead, plus margin


# -- the generated tree ------------------------------------------------------------------------
def generated_split(split_dir: Path, num_files: int, classes: list[str]):
    """A :class:`layout.Split` of ``num_files`` names spread over ``classes`` (class folders made,
    empty), in the order :func:`layout.scan_split` lists a tree (by class, then by name)."""
    from data_pipelines import layout

    files, labels = [], []
    for c, wnid in enumerate(classes):
        (split_dir / wnid).mkdir(parents=True)
        count = num_files // len(classes) + (c < num_files % len(classes))
        files += [f"{split_dir}/{wnid}/{wnid}_{i:07d}.JPEG" for i in range(count)]
        labels += [c] * count
    return layout.Split(root=split_dir, classes=list(classes), files=files, labels=labels)


def link_first_batches(split, sources: list[Path], worlds: list[int], batch_size: int) -> int:
    """Hard-link real JPEGs under the names the first batches of every rank read; returns how many."""
    from data_pipelines import sharding

    needed: set[int] = set()
    for world in worlds:
        for rank in range(world):
            idx = sharding.train_indices(len(split), epoch=0, seed=SEED, shard_id=rank, num_shards=world,
                                         batch_size=batch_size)
            needed.update(idx[: BATCHES_WITH_FILES * batch_size].tolist())
    for n, i in enumerate(sorted(needed)):
        os.link(sources[n % len(sources)], split.files[i])
    return len(needed)


def age(root: Path, seconds: float = 60.0) -> None:
    """Folders written just now are not cached (filelist.py's timestamp rule): move them back."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def prepare(work: Path, args) -> Path:
    """The tree, its first batches' JPEGs and both cache files, under ``work``; returns the root."""
    from data_pipelines import filelist
    from data_pipelines.sample import make_sample_tree

    sources = sorted((make_sample_tree(work / "src", num_classes=2, train_per_class=8, val_per_class=1,
                                       image_size=(500, 375)) / "train").glob("*/*.JPEG"))
    root = work / "imagenet"
    classes = [f"n{c:08d}" for c in range(args.classes)]
    train = generated_split(root / "train", args.lines, classes)
    val = generated_split(root / "val", args.val_lines, classes)
    linked = link_first_batches(train, sources, args.procs, args.batch_size)
    age(root)
    cache = work / "xdg" / "imagenet-trainer"
    filelist.write_file_list(train, filelist.cache_path(root, "train", cache_dir=cache))
    filelist.write_file_list(val, filelist.cache_path(root, "val", classes, cache_dir=cache))
    print(f"generated: {len(train):,} + {len(val):,} listed files over {len(classes):,} classes, "
          f"{linked:,} of them real JPEGs", file=sys.stderr)
    return root


# -- one rank -------------------------------------------------------------------------------
def rank_main(root: str, batch_size: int, threads: int) -> None:
    """What a training rank runs before its first step; prints when each part ended (epoch s)."""
    from data_pipelines import layout
    from data_pipelines.dali import DALILoader, PipelineOptions
    from data_pipelines.datamodule import ImageNetDataModule

    imported = time.time()

    def no_scan(*_args, **_kwargs):
        raise AssertionError("listed the tree: the bench measures reading the cached list")

    layout.scan_split = no_scan
    dm = ImageNetDataModule(root=root, backend="dali_cpu", on_gpu=False, batch_size=batch_size,
                            image_size=IMAGE_SIZE, val_resize=VAL_RESIZE, num_workers=threads, seed=SEED)
    train, _ = dm.splits
    listed = time.time()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The arguments ImageNetDataModule passes on a CPU run (dali_cpu, normalised on this CPU).
    options = PipelineOptions(image_size=IMAGE_SIZE, val_resize=VAL_RESIZE, device="cpu", num_threads=threads,
                              output_device="cpu")
    loader = DALILoader(train.files, train.labels, train=True, batch_size=batch_size, shard_id=rank,
                        num_shards=world, seed=SEED, options=options)
    images, _ = next(iter(loader))
    assert tuple(images.shape) == (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    marks = {"imported": imported, "listed": listed, "first_batch": time.time()}
    # CPU seconds of the whole process (DALI's threads included) since it started: on a box with
    # fewer cores than ranks, wall time measures the contention, this the work of one rank.
    print(json.dumps({**marks, "cpu": time.process_time()}), flush=True)
    os._exit(0)  # the loader's threads and later batches are not part of start-up


# -- the launcher ------------------------------------------------------------------------------
def start_together(root: Path, world: int, args) -> list[dict[str, float]]:
    """Start ``world`` ranks at once; seconds from each one's start to its milestones."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID")}
    base.update(XDG_CACHE_HOME=str(root.parent / "xdg"), WORLD_SIZE=str(world), PYTHONWARNINGS="ignore")
    started, procs = [], []
    for rank in range(world):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        cmd = [sys.executable, __file__, "--rank-of", str(root), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
        started.append(time.time())
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    times = []
    for t0, proc in zip(started, procs):
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"a rank of {world} exited with {proc.returncode}")
        marks = json.loads(out.strip().splitlines()[-1])
        cpu = marks.pop("cpu")
        times.append({**{k: v - t0 for k, v in marks.items()}, "cpu": cpu})
    return times


def summary(world: int, runs: list[dict[str, float]]) -> str:
    first = [r["first_batch"] for r in runs]
    imports = statistics.median(r["imported"] for r in runs)
    listing = statistics.median(r["listed"] - r["imported"] for r in runs)
    loader = statistics.median(r["first_batch"] - r["listed"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    return (f"| {world} | {statistics.median(first):.1f} s | {max(first):.1f} s | {imports:.1f} s | "
            f"{listing:.2f} s | {loader:.2f} s | {cpu:.1f} s |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 8], help="processes started together")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=1_281_167, help="train files listed")
    parser.add_argument("--val-lines", type=int, default=50_000, help="val files listed")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--threads", type=int, default=2, help="DALI threads per rank")
    parser.add_argument("--rank-of", metavar="ROOT", help=argparse.SUPPRESS)  # a started rank
    args = parser.parse_args(argv)
    if args.rank_of:
        return rank_main(args.rank_of, args.batch_size, args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = prepare(Path(tmp), args)
        results: dict[int, list[dict[str, float]]] = {w: [] for w in args.procs}
        for _ in range(args.rounds):  # interleaved, so that a busy spell hits every row
            for world in args.procs:
                results[world] += start_together(root, world, args)
    print(f"| processes | first batch (median) | first batch (max) | imports (median) | "
          f"file lists (median) | loader + first batch (median) | CPU s per process (median) |")
    print("|---|---|---|---|---|---|---|")
    for world in args.procs:
        print(summary(world, results[world]))


if __name__ == "__main__":
    main()
