"""``imagenet-trainer prepare SOURCE... OUT``: what users download (the ILSVRC-2012 archives,
Kaggle's folder, Hugging Face's files, or a folder tree) straight into a pack, or into the sorted
folder tree (``--layout folders``), with the class names; no extraction step.

:mod:`.sources` recognises and reads each kind of source (archives read in place, by byte range);
:mod:`.write` makes them the equivalent folder tree and writes it as ``pack`` would (same plan,
same bytes, same resume) or as files. A run killed at any point, run again with the same
arguments, finishes with the output an uninterrupted run gives.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from .. import check, layout, pack
from ..pack_format import MANIFEST
from .common import ArgumentError, SourceError
from .official import verify_md5
from .sources import gather, kinds_of
from .write import Outcome, remove_spool, resolve, write_folders, write_pack

VERB = "imagenet-trainer prepare"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Read the ImageNet download you have, without extracting it, into a pack (as `pack` writes from a folder\n"
        "tree: byte-identical to `pack` of the equivalent tree) or, with --layout folders, into that tree.\n"
        "Sources, recognised from what they hold:\n"
        "  ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar ILSVRC2012_devkit_t12.tar.gz   (the official archives)\n"
        "  KAGGLE_FOLDER              (ILSVRC/Data/CLS-LOC, LOC_val_solution.csv, LOC_synset_mapping.txt)\n"
        "  train_images_*.tar.gz val_images.tar.gz                            (Hugging Face imagenet-1k)\n"
        "  train-*.parquet validation-*.parquet + the devkit or a LOC_synset_mapping.txt (the wnid of each label)\n"
        "  synset_words.txt / LOC_synset_mapping.txt                          (class names)\n"
        "  ROOT with train/<wnid>/ and val/<wnid>/                            (a folder tree, as `pack` reads)\n"
        "Keys keep each file's stem (n01440764/n01440764_10026, n01751748/ILSVRC2012_val_00000001); class names\n"
        "(meta.mat's words, LOC_synset_mapping.txt) go into manifest.json's \"names\" (folders: synset_words.txt).\n"
        "Gzip'd tars and parquet files are copied once into OUT/.pack/spool/ (their images' bytes), removed at the end.")
    p.epilog = (
        "Exit 1 when some image does not decode (each listed; nothing written) or a source is damaged or\n"
        "contradicts another (named); 2 on a bad argument. Killed? Run it again with the same arguments.\n\n"
        "Example:\n"
        "  imagenet-trainer prepare ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar \\\n"
        "      ILSVRC2012_devkit_t12.tar.gz /datasets/imagenet-shards --shard-size 1GB")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="archives, files or folders (see above)")
    p.add_argument("out", metavar="OUT", help="the pack's folder (or the tree's, with --layout folders)")
    p.add_argument("--layout", choices=["pack", "folders"], default="pack",
                   help="pack: tar shards and manifest.json (default); folders: OUT/train/<wnid>/, OUT/val/<wnid>/")
    p.add_argument("--shard-size", default=pack.DEFAULT_SHARD_SIZE,
                   help="most bytes of tar per shard: 512MB, 1GB, 64KB, 1MiB or bytes (default 512MB)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that decode and write (default: CPU cores available)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out the images that do not decode (listed in the manifest) instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of the train images' order (default 0)")
    p.add_argument("--verify-md5", action="store_true",
                   help="check the official archives against their published MD5s first (hashing 155 GB takes long)")


def _say(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


def prepare(sources: list[str | os.PathLike], out: str | os.PathLike, *, layout_: str = "pack",
            shard_size: str | int = pack.DEFAULT_SHARD_SIZE, workers: int | None = None, skip_bad: bool = False,
            seed: int = 0, verify_md5_: bool = False, progress: bool | None = None, say=_say) -> Outcome:
    """Prepare ``sources`` into ``out`` (see the module docstring). Raises :class:`ArgumentError` (bad
    arguments), :class:`SourceError` (a damaged or contradictory source); bad images: the outcome's
    ``bad``, and without ``skip_bad`` nothing written (``ok`` False)."""
    start = time.perf_counter()
    paths = [Path(os.path.abspath(s)) for s in sources]
    out = Path(os.path.abspath(out))
    size = pack.parse_size(shard_size)
    workers = check.default_workers() if workers is None else max(0, int(workers))
    if progress is None:
        progress = sys.stderr.isatty()
    if layout_ not in ("pack", "folders"):
        raise ArgumentError(f"--layout={layout_!r}: choose pack or folders")
    for path in paths:
        if out == path or path in out.parents:
            raise ArgumentError(f"OUT={out} is inside the source {path}: give the output a folder of its own")
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"OUT={out} exists and is not a folder")
    kinds = kinds_of(paths)
    if verify_md5_:
        verify_md5(kinds, say)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = pack._lock(out, "pack or prepare")  # OUT/.pack/lock: one run per OUT (the spool lives in OUT/.pack too)
    spool = out / pack.STATE / "spool"
    pack.close_ranges()  # descriptors cached by an earlier run in this process may be of replaced files
    ok = False
    try:
        say(f"reading {len(paths)} source(s): " + ", ".join(f"{p.name} ({k})" for k, p in kinds))
        data = resolve(gather(kinds, spool))
        say(f"{len(data.classes)} classes, {len(data.items['train'])} train and {len(data.items['val'])} val images"
            + ("" if data.names else " (no class names among the sources)"))
        if layout_ == "pack":
            outcome = write_pack(data, out, source_root=os.pathsep.join(str(p) for p in paths), shard_size=size,
                                 workers=workers, skip_bad=skip_bad, seed=seed, progress=progress, say=say)
        else:
            outcome = write_folders(data, out, workers=workers, skip_bad=skip_bad, progress=progress, say=say)
        ok = outcome.ok
        outcome.seconds = time.perf_counter() - start  # all of it: reading the sources too
    finally:
        pack.close_ranges()
        os.close(lock)
        if ok:
            remove_spool(spool)
            if layout_ == "folders":
                shutil.rmtree(out / pack.STATE, ignore_errors=True)
        elif created:  # nothing of a failed first run stays (a resumed run keeps its finished work)
            shutil.rmtree(out, ignore_errors=True)
    return outcome


def main(args: argparse.Namespace) -> int:
    """The ``prepare`` verb: 0 done; 1 bad images (listed on stdout as ``where: reason``) or a damaged
    source; 2 bad arguments (the message on stderr)."""
    try:
        outcome = prepare(args.sources, args.out, layout_=args.layout, shard_size=args.shard_size,
                          workers=args.workers, skip_bad=args.skip_bad, seed=args.seed, verify_md5_=args.verify_md5)
    except SourceError as err:
        print(f"{VERB}: {err}", file=sys.stderr)
        return 1
    except (layout.DataLayoutError, OSError) as err:
        print(f"{VERB}: {err}", file=sys.stderr)
        return 2
    for where, reason in outcome.bad:
        print(f"{where}: {reason}")
    if not outcome.ok:
        print(f"{VERB}: {len(outcome.bad)} image(s) are bad; nothing was written to {args.out}. Pass --skip-bad to "
              f"prepare the others (the manifest lists the ones left out)", file=sys.stderr)
        return 1
    if outcome.bad:
        print(f"{VERB}: left out {len(outcome.bad)} bad image(s) (--skip-bad)", file=sys.stderr)
    images = sum(outcome.images.values())
    rate = images / max(outcome.seconds, 1e-9)
    if args.layout == "pack":
        _say(f"kept {outcome.kept} finished shard(s) of an earlier run (verified), wrote {outcome.written}")
        _say(f"done: train {outcome.images['train']} images in {outcome.shards['train']} shard(s), val "
             f"{outcome.images['val']} images in {outcome.shards['val']} shard(s), {outcome.bytes} bytes; "
             f"{rate:.0f} images/s ({outcome.seconds:.1f} s); {Path(args.out) / MANIFEST}")
    else:
        _say(f"done: train {outcome.images['train']} and val {outcome.images['val']} images in {args.out} "
             f"({outcome.kept} already there); {rate:.0f} images/s")
    return 0
