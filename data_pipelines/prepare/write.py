"""The output of `imagenet-trainer prepare`: the gathered entries as the folder tree they stand for
(class order, labels, listing order, keys), decode-checked, then written as ``pack`` writes a pack
(:mod:`data_pipelines.pack`'s plan, shard writer and records, so the pack is byte-identical to
``pack`` of the equivalent tree) or as that tree itself (``--layout folders``)."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import check, files, layout, pack, pack_format
from ..pack import Item
from ..pack_format import MANIFEST, SPLITS, sample_key
from ..progress import progress_bar
from .common import ArgumentError, Entry, Gathered, SourceError


@dataclass
class Dataset:
    """The equivalent tree: classes (sorted train wnids), each split's items in listing order."""

    classes: list[str]
    names: list[str] | None
    items: dict[str, list[Item]]
    where: dict[Item, str] = field(repr=False)
    entries: dict[Item, Entry] = field(repr=False)


def resolve(found: Gathered) -> Dataset:
    """Labels (wnid -> sorted-train-wnid index), listing order and keys; a :class:`SourceError` for a
    val wnid unknown to train or two images of one key."""
    if not found.train:
        raise ArgumentError("no train images among the sources: give the train archive (or Kaggle's folder, Hugging "
                            "Face's train files, a folder tree)")
    if not found.val:
        raise ArgumentError("no val images among the sources: give the val archive and the devkit (or Kaggle's "
                            "folder, Hugging Face's val files, a folder tree)")
    classes = sorted({e.wnid for e in found.train})
    index = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[Item]] = {}
    where: dict[Item, str] = {}
    entries: dict[Item, Entry] = {}
    for split, listed in (("train", found.train), ("val", found.val)):
        seen: dict[str, Entry] = {}
        out = []
        for entry in sorted(listed, key=lambda e: (e.wnid, e.filename)):  # layout.scan_split's order
            if entry.wnid not in index:
                raise SourceError(f"{entry.where}: class {entry.wnid} has no train images: every val class needs "
                                  f"train images (are train and val from the same dataset?)")
            key = sample_key(f"{entry.wnid}/{entry.filename}")
            if key in seen:
                raise SourceError(f"{seen[key].where} and {entry.where} both make the {split} key {key!r}: one image "
                                  f"given twice (the same source passed twice?), or two names that differ only in "
                                  f"dots and spaces")
            seen[key] = entry
            item = Item(entry.path, key, index[entry.wnid], entry.size, entry.mtime_ns, entry.offset)
            out.append(item)
            where[item], entries[item] = entry.where, entry
        items[split] = out
    names = [found.names.get(c, "") for c in classes] if found.names else None
    return Dataset(classes, names, items, where, entries)


# -- the decode check -----------------------------------------------------------------------------
def _check_chunk(chunk: list[tuple[int, Item]]) -> list[tuple[int, str | None]]:
    out = []
    for i, item in chunk:
        try:
            reason = check.check_bytes(pack._read(item))
        except pack.PackError as err:
            reason = f"cannot be read: {err}"
        out.append((i, reason))
    return out


def _chunked(fn, work: list, workers: int, progress: bool, count):
    """``fn`` over ``work`` in chunks of 64, in ``workers`` processes (pack's workers: they die with
    this process), in order; a progress bar advanced by ``count(result)``. Yields each result."""
    chunks = [work[i:i + 64] for i in range(0, len(work), 64)]
    bar = progress_bar(len(work)) if progress else None
    pool = None
    try:
        if workers <= 1 or len(chunks) < 2:
            results = map(fn, chunks)
        else:
            pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
                                       initializer=pack._worker_init, initargs=(os.getpid(),))
            results = pool.map(fn, chunks)
        for result in results:
            if bar is not None:
                bar.update(count(result))
            yield result
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()


def check_items(items: list[Item], workers: int, progress: bool) -> dict[Item, str]:
    """Why each item that does not decode (as check-data decodes) cannot be used, by item."""
    bad: dict[Item, str] = {}
    for result in _chunked(_check_chunk, list(enumerate(items)), workers, progress, len):
        for i, reason in result:
            if reason is not None:
                bad[items[i]] = reason
    return bad


def _listed(data: Dataset, bad: dict[Item, str], every: list[Item]) -> list[tuple[str, str]]:
    """(where, reason) of the bad items, in listing order."""
    return [(data.where[i], bad[i]) for i in every if i in bad]


# -- a pack ---------------------------------------------------------------------------------------
def _plan(out: Path, data: Dataset, bad: set[Item], seed: int, size: int) -> dict[str, list[pack.ShardPlan]]:
    """pack's plan: the train items in ``default_rng(seed).permutation`` of listing order, val in listing order."""
    return pack.plan_items(out, [i for i in data.items["train"] if i not in bad],
                           [i for i in data.items["val"] if i not in bad], seed, size)


def _decoded_before(out: Path, data: Dataset, seed: int, size: int) -> set[Item]:
    """Items in shards whose record has this plan's digest: decoded by the run that wrote them."""
    known: set[Item] = set()
    for shard in (s for shards in _plan(out, data, set(), seed, size).values() for s in shards):
        try:
            record = json.loads(pack._record_path(shard).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("plan") == shard.digest:
            known.update(shard.items)
    return known


@dataclass
class Outcome:
    bad: list[tuple[str, str]]  # (where, reason)
    ok: bool = False
    images: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    kept: int = 0
    written: int = 0
    seconds: float = 0.0


def write_pack(data: Dataset, out: Path, *, source_root: str, shard_size: int, workers: int, skip_bad: bool,
               seed: int, progress: bool, say) -> Outcome:
    """Decode-check (all but what an earlier run of the same plan wrote), then write the pack as
    ``pack`` does; OUT/.pack/lock is held by the caller."""
    start = time.perf_counter()
    every = data.items["train"] + data.items["val"]
    known = _decoded_before(out, data, seed, shard_size) if (out / pack.STATE).is_dir() else set()
    todo = [i for i in every if i not in known]
    if known:
        say(f"{len(every) - len(todo)} of the {len(every)} images are in shards an earlier run of the same plan "
            f"finished: decoded then, not again")
    how = "Pillow and nvImageCodec (DALI's decoder)" if check.dali_decoder_available() else "Pillow only"
    say(f"decoding {len(todo)} of the {len(every)} images ({len(data.items['train'])} train, "
        f"{len(data.items['val'])} val) with {how}, {workers} worker(s)")
    bad = check_items(todo, workers, progress)
    outcome = Outcome(_listed(data, bad, every))
    if bad and not skip_bad:
        return outcome
    plan = _plan(out, data, set(bad), seed, shard_size)
    if not plan["train"]:
        raise SourceError("no train image decodes: nothing to pack")
    shards = plan["train"] + plan["val"]
    pack._clean(out, {name: len(plan[name]) for name in SPLITS})
    say(f"writing {len(plan['train'])} train and {len(plan['val'])} val shard(s) of at most {shard_size} bytes into "
        f"{out}, {min(max(workers, 1), len(shards))} worker(s)")
    result = pack.PackResult(out, None, [])
    records = pack._write_shards(shards, workers, result, progress, False)
    manifest = pack_format.manifest(
        classes=data.classes, source_root=source_root, seed=seed, shard_size=shard_size,
        splits={name: [records[s.name] for s in plan[name]] for name in SPLITS},
        skipped=[{"path": w, "reason": r} for w, r in outcome.bad], names=data.names)
    files.write_atomic(out / MANIFEST, pack_format.manifest_bytes(manifest), unique=True)
    outcome.ok, outcome.kept, outcome.written = True, result.kept, result.written
    outcome.images = {name: manifest["splits"][name]["images"] for name in SPLITS}
    outcome.shards = {name: len(plan[name]) for name in SPLITS}
    outcome.bytes = sum(s.bytes for s in shards)
    outcome.seconds = time.perf_counter() - start
    return outcome


# -- a folder tree --------------------------------------------------------------------------------
def _copy_chunk(chunk: list[tuple[Item, str]]) -> int:
    for item, target in chunk:
        files.write_atomic(target, pack._read(item), unique=True)
    return len(chunk)


def write_folders(data: Dataset, out: Path, *, workers: int, skip_bad: bool, progress: bool, say) -> Outcome:
    """``OUT/train/<wnid>/<file>``, ``OUT/val/<wnid>/<file>`` and ``OUT/synset_words.txt``, each file
    written atomically; a file already there at its size (an earlier run's) is kept, not decoded again."""
    start = time.perf_counter()
    every = data.items["train"] + data.items["val"]
    split_of = {i: s for s in SPLITS for i in data.items[s]}

    def target(item: Item) -> Path:
        entry = data.entries[item]
        return out / split_of[item] / entry.wnid / entry.filename

    def present(item: Item) -> bool:
        try:
            return target(item).stat().st_size == item.size
        except OSError:
            return False

    todo = [i for i in every if not present(i)]
    say(f"decoding {len(todo)} of the {len(every)} images ({len(every) - len(todo)} already written), "
        f"{workers} worker(s)")
    bad = check_items(todo, workers, progress)
    outcome = Outcome(_listed(data, bad, every))
    if bad and not skip_bad:
        return outcome
    work = [(i, str(target(i))) for i in todo if i not in bad]
    say(f"writing {len(work)} files into {out}")
    for _ in _chunked(_copy_chunk, work, workers, progress, lambda n: n):
        pass
    if data.names is not None:
        text = "".join(f"{c} {w}\n" for c, w in zip(data.classes, data.names) if w)
        files.write_atomic(out / layout.NAMES_FILE, text)
    outcome.ok, outcome.written, outcome.kept = True, len(work), len(every) - len(todo)
    outcome.images = {s: len([i for i in data.items[s] if i not in bad]) for s in SPLITS}
    outcome.bytes = sum(i.size for i in every if i not in bad)
    outcome.seconds = time.perf_counter() - start
    return outcome


def remove_spool(spool: Path) -> None:
    shutil.rmtree(spool, ignore_errors=True)
