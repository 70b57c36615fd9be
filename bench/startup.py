"""Start-up time: from process start to the first training batch, on an ImageNet-sized file list
or (``--pack``) an ImageNet-sized pack of tar shards.

    python bench/startup.py                       # 1 and 8 processes, 3 rounds each
    python bench/startup.py --procs 1 8 64 --rounds 5 --threads 4
    python bench/startup.py --pack                # a manifest of 1,281,167 + 50,000 images instead
    python bench/startup.py --pack --rank0-only   # only rank 0 of each N: one rank with cores to itself

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

``--pack``: the same, reading a pack (:mod:`data_pipelines.shards`) through
``ImageNetDataModule(root=PACK, backend="dali_cpu")``: ``splits`` reads and checks its
``manifest.json`` (every shard's tar and index stat'ed), the loader writes this rank's per-epoch
reader indices (``shards.write_reader_indices``) and DALI's webdataset reader parses them when the
pipeline is built. This bench **generates the indices, not the 140 GB of images**:
``--lines`` / ``--per-shard`` train shards (1,281 for ImageNet: 167 of 1,001 images, 1,114 of
1,000) and ``--val-lines`` / ``--per-shard`` val shards (50 of 1,000), each a real GNU tar of
``--members`` (8) real JPEGs (500x375, quality 90, ``photos.photo``: 16 distinct photos, 8 to a
tar, about 0.65 MB a tar) and their ``.cls`` members, whose index lists ``--per-shard`` samples,
each line with a key of its own (``n<class>/n<class>_<sample id>``, ImageNet's key length) and
the offsets and sizes of the tar's members taken in turn (sample i is member i % 8). The
``manifest.json`` has the true counts, each tar's true size and sha256, 1,000 classes. So every
index line DALI parses, every file opened or stat'ed and every image decoded for the first batch is
real; what differs from ImageNet's 512 MB shards is only the bytes never read before the first
batch (and offsets of 6 digits, not 9: 3 bytes a line shorter). ``--pack`` also times the parts of
"loader + first batch" inside the rank: the epoch's order (``shards.train_ids``), writing the
reader indices, building the DALI pipeline (its index parsing) and the first batch itself.
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
PACK_PHOTOS = 16  # distinct generated JPEGs, shared out over the generated shards
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


# -- the generated pack ------------------------------------------------------------------------
def _tar_member(name: str, data: bytes) -> bytes:
    """A GNU tar member: header, data, zeros to the 512-byte block (as ``pack`` writes them)."""
    from data_pipelines import pack_format

    return pack_format.member_header(name, len(data)) + data + bytes(pack_format.pad(len(data)) - len(data))


def _pack_shard(out: Path, name: str, first: int, count: int, jpegs: list[bytes], labels: list[int],
                classes: list[str]) -> dict:
    """``out/name.tar`` with the JPEGs ``jpegs`` (labels ``labels``) and ``out/name.idx`` listing
    ``count`` samples, ids ``first`` on, each a key of its own pointing at member ``i % len(jpegs)``;
    returns the manifest's entry."""
    import hashlib
    import tarfile

    from data_pipelines import pack_format

    body, members = bytearray(), []
    for j, (data, label) in enumerate(zip(jpegs, labels)):
        key = f"{classes[label]}/{classes[label]}_{first + j}"
        entry = []
        for ext, payload in (("jpg", data), ("cls", str(label).encode())):
            entry.append((len(body) + tarfile.BLOCKSIZE, len(payload)))  # names under 100 bytes: one header block
            body += _tar_member(f"{key}.{ext}", payload)
        members.append((label, entry))
    body += bytes(2 * tarfile.BLOCKSIZE)
    body += bytes(-len(body) % tarfile.RECORDSIZE)
    lines = []
    for i in range(count):
        label, ((jpg_off, jpg_size), (cls_off, cls_size)) = members[i % len(members)]
        key = f"{classes[label]}/{classes[label]}_{first + i}"
        lines.append(pack_format.index_line([("jpg", jpg_off, jpg_size, f"{key}.jpg"), ("cls", cls_off, cls_size, f"{key}.cls")]))
    (out / f"{name}.tar").write_bytes(body)
    (out / f"{name}.idx").write_text(pack_format.index_text(lines))
    return {"tar": f"{name}.tar", "index": f"{name}.idx", "images": count, "bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest()}


def prepare_pack(work: Path, args) -> Path:
    """A pack describing ``args.lines`` train and ``args.val_lines`` val images (module
    docstring: real tars of ``args.members`` JPEGs, indices of ``args.per_shard`` lines); returns
    its folder."""
    import io

    import numpy as np

    from data_pipelines import pack_format
    from tests import photos

    start = time.perf_counter()
    jpegs = []
    for i in range(PACK_PHOTOS):
        buffer = io.BytesIO()
        photos.photo(np.random.default_rng([SEED, i]), 500, 375).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    out = work / "pack"
    out.mkdir()
    classes = [f"n{c:08d}" for c in range(args.classes)]
    splits, tar_bytes = {}, 0
    for split, total in (("train", args.lines), ("val", args.val_lines)):
        count = max(1, total // args.per_shard)
        entries, first = [], 0
        for s in range(count):
            n = total // count + (s < total % count)
            pick = [(s * args.members + j) % PACK_PHOTOS for j in range(min(args.members, n))]
            labels = [(s * args.members + j) % len(classes) for j in range(len(pick))]
            entries.append(_pack_shard(out, pack_format.shard_name(split, s), first, n, [jpegs[k] for k in pick],
                                       labels, classes))
            first += n
        splits[split] = {"images": first, "shards": entries}
        tar_bytes += sum(e["bytes"] for e in entries)
    manifest = pack_format.manifest(classes=classes, source_root="(generated by bench/startup.py --pack)", seed=SEED,
                                    shard_size=512_000_000, splits={k: v["shards"] for k, v in splits.items()}, skipped=[])
    (out / pack_format.MANIFEST).write_bytes(pack_format.manifest_bytes(manifest))
    print(f"generated a pack of {splits['train']['images']:,} + {splits['val']['images']:,} indexed images in "
          f"{len(splits['train']['shards']):,} + {len(splits['val']['shards']):,} shards ({tar_bytes / 1e6:.0f} MB "
          f"of tar, {args.members} JPEGs a tar) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


# -- one rank -------------------------------------------------------------------------------
def _timed(parts: dict[str, float], name: str, func):
    """``func``, adding its wall seconds to ``parts[name]`` at each call."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - start

    return timed


def rank_main(root: str, batch_size: int, threads: int) -> None:
    """What a training rank runs before its first step; prints when each part ended (epoch s)."""
    from data_pipelines import layout, shards
    from data_pipelines.dali import DALILoader, PipelineOptions
    from data_pipelines.datamodule import ImageNetDataModule
    from data_pipelines.specs import DataSpec

    imported = time.time()

    def no_scan(*_args, **_kwargs):
        raise AssertionError("listed the tree: the bench measures reading the cached list")

    layout.scan_split = no_scan
    parts: dict[str, float] = {}
    if shards.is_sharded(root):  # the parts of "loader + first batch", for a pack
        shards.train_ids = _timed(parts, "order", shards.train_ids)
        shards.write_reader_indices = _timed(parts, "indices", shards.write_reader_indices)
        DALILoader._build = _timed(parts, "build", DALILoader._build)  # noqa: SLF001 - includes "indices"
    dm = ImageNetDataModule(DataSpec(root=root, backend="dali_cpu", batch_size=batch_size, image_size=IMAGE_SIZE,
                                     val_resize=VAL_RESIZE, num_workers=threads, seed=SEED), on_gpu=False)
    train, _ = dm.splits
    listed = time.time()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The arguments ImageNetDataModule passes on a CPU run (dali_cpu, normalised on this CPU).
    options = PipelineOptions(image_size=IMAGE_SIZE, val_resize=VAL_RESIZE, device="cpu", num_threads=threads,
                              output_device="cpu")
    loader = DALILoader(train, train=True, batch_size=batch_size, shard_id=rank, num_shards=world, seed=SEED,
                        options=options)
    images, _ = next(iter(loader))
    assert tuple(images.shape) == (batch_size, 3, IMAGE_SIZE, IMAGE_SIZE)
    marks = {"imported": imported, "listed": listed, "first_batch": time.time()}
    # CPU seconds of the whole process (DALI's threads included) since it started: on a box with
    # fewer cores than ranks, wall time measures the contention, this the work of one rank.
    print(json.dumps({**marks, "cpu": time.process_time(), "parts": parts}), flush=True)
    loader.reader.close()  # a pack's reader indices (115 MB for one rank): os._exit skips their cleanup
    os._exit(0)  # the loader's threads and later batches are not part of start-up


# -- the launcher ------------------------------------------------------------------------------
def start_together(root: Path, world: int, args) -> list[dict[str, float]]:
    """Start ``world`` ranks at once (only rank 0 of them with ``args.rank0_only``); seconds from
    each one's start to its milestones."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "SLURM_LOCALID")}
    base.update(XDG_CACHE_HOME=str(root.parent / "xdg"), WORLD_SIZE=str(world), PYTHONWARNINGS="ignore")
    started, procs = [], []
    for rank in range(1 if getattr(args, "rank0_only", False) else world):
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
        cpu, parts = marks.pop("cpu"), marks.pop("parts", {})
        times.append({**{k: v - t0 for k, v in marks.items()}, "cpu": cpu, "parts": parts})
    return times


def parts_summary(world: int | str, runs: list[dict]) -> str:
    """The parts of "loader + first batch" (medians): order, reader indices, pipeline build
    without them, first batch (the rest)."""
    def part(name: str) -> float:
        return statistics.median(r["parts"].get(name, 0.0) for r in runs)

    loader = statistics.median(r["first_batch"] - r["listed"] for r in runs)
    build = part("build") - part("indices")
    rest = statistics.median(r["first_batch"] - r["listed"] - r["parts"].get("order", 0.0)
                             - r["parts"].get("build", 0.0) for r in runs)
    return (f"| {world} | {loader:.2f} s | {part('order'):.2f} s | {part('indices'):.2f} s | {build:.2f} s | "
            f"{rest:.2f} s |")


def summary(world: int | str, runs: list[dict[str, float]], digits: int = 1) -> str:
    first = [r["first_batch"] for r in runs]
    imports = statistics.median(r["imported"] for r in runs)
    listing = statistics.median(r["listed"] - r["imported"] for r in runs)
    loader = statistics.median(r["first_batch"] - r["listed"] for r in runs)
    cpu = statistics.median(r["cpu"] for r in runs)
    return (f"| {world} | {statistics.median(first):.{digits}f} s | {max(first):.{digits}f} s | {imports:.{digits}f} s | "
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
    parser.add_argument("--pack", action="store_true", help="read a generated pack of tar shards (docstring)")
    parser.add_argument("--per-shard", type=int, default=1000, help="--pack: images listed per shard index")
    parser.add_argument("--members", type=int, default=8, help="--pack: real JPEGs per shard tar")
    parser.add_argument("--rank0-only", action="store_true",
                        help="start only rank 0 of each N: one rank's start-up when it has the cores to itself")
    parser.add_argument("--rank-of", metavar="ROOT", help=argparse.SUPPRESS)  # a started rank
    args = parser.parse_args(argv)
    if args.rank_of:
        return rank_main(args.rank_of, args.batch_size, args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = prepare_pack(Path(tmp), args) if args.pack else prepare(Path(tmp), args)
        results: dict[int, list[dict[str, float]]] = {w: [] for w in args.procs}
        for _ in range(args.rounds):  # interleaved, so that a busy spell hits every row
            for world in args.procs:
                results[world] += start_together(root, world, args)
    lists = "manifest" if args.pack else "file lists"
    print(f"| processes | first batch (median) | first batch (max) | imports (median) | "
          f"{lists} (median) | loader + first batch (median) | CPU s per process (median) |")
    print("|---|---|---|---|---|---|---|")
    label = (lambda world: f"rank 0 of {world}") if args.rank0_only else (lambda world: world)
    for world in args.procs:
        print(summary(label(world), results[world], 2 if args.pack else 1))
    if args.pack:
        print("\nloader + first batch, its parts (medians, wall s in the rank):\n")
        print("| processes | loader + first batch | epoch order (`shards.train_ids`) | reader indices "
              "(`write_reader_indices`) | pipeline build (DALI parses the indices) | first batch (read, decode, "
              "resize, normalise) |")
        print("|---|---|---|---|---|---|")
        for world in args.procs:
            print(parts_summary(label(world), results[world]))


if __name__ == "__main__":
    main()
