"""``imagenet-trainer pack ROOT OUT``: an ImageNet-layout folder tree into tar shards.

The format (WebDataset tars with DALI ``v1.2`` indices and a ``manifest.json``) is defined in
:mod:`data_pipelines.pack_format`; this module plans the shards and writes them:

1. **Check.** ``ROOT/train`` and ``ROOT/val`` are scanned as :mod:`layout` scans them (class order,
   labels), every file's key is made (a collision is an error naming both files) and every file is
   decoded as ``check-data`` decodes it (:func:`check.check_files`, Pillow and nvImageCodec, in
   ``workers`` processes). A bad file stops the pack before anything is written in ``OUT`` (exit
   1), unless ``skip_bad``: then it is left out and listed in the manifest's ``skipped``.
2. **Plan.** The train images in a seeded random order (``np.random.default_rng(seed)
   .permutation``: every shard mixes the classes), the val images in listing order, cut into
   shards of at most ``shard_size`` bytes of tar (headers, padded data, the end-of-archive blocks;
   at least one image a shard). The tars are deterministic (:mod:`pack_format`), so a shard's
   bytes, size and index follow from the plan: its files, their sizes and labels, in order. The
   same tree, seed and shard size give byte-identical shards.
3. **Write.** Each shard is written by one worker process: the tar and its index to temporary
   names in ``OUT``, fsync'ed, renamed into place; then a record of the shard,
   ``OUT/.pack/<split>-NNNNNN.json`` (the plan's digest: every source file's absolute path, size,
   mtime and label, in order; the tar's bytes and sha256; the index's sha256), written atomically.
   ``manifest.json`` is removed before the first shard is touched and written last, atomically.

**Resume.** A pack that was killed, run again with the same arguments, decodes only the images of
the shards still to write (those of shards with a record of this plan were decoded before the
record was written, and the digest covers each file's size and mtime), recomputes the same plan
and keeps every shard whose record has the plan's digest and whose tar and index re-hash to the
recorded sha256 at the recorded size (the check runs in the workers, reading each kept tar once);
every other shard is written again, shards beyond the plan (an earlier pack had more) and stale
temporary files are removed, then the manifest is written. A pack of other arguments or of a
changed tree in the same ``OUT`` is the same case: the records that no longer match are rewritten.
``OUT/.pack/lock`` (``flock``) keeps two packs out of one ``OUT``; the writing processes die with
the pack that started them (``PR_SET_PDEATHSIG``), so a killed pack leaves no writer behind.
``PAUSE_ENV`` (a test hook) makes each shard's writer, once the shard and its record are written,
append the shard's name to the file it names and wait there to be killed: a test kills a pack at a
known point instead of racing a timer.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import check, files, layout, pack_format
from .files import write_atomic  # the name `files` is pack()'s list of images
from .pack_format import ENCODING, ERRORS, FORMAT, MANIFEST, SPLITS, VERSION, WRITER, sample_key
from .progress import progress_bar

DEFAULT_SHARD_SIZE = "512MB"
STATE = ".pack"  # OUT/.pack/: a record per finished shard, and the lock
# Test hook: a file that each shard's writer, its record written, appends the shard's name to, then
# waits to be killed: a test kills a pack at a known point, not at a time a loaded machine may miss.
PAUSE_ENV = "IMAGENET_TRAINER_PACK_TEST_PAUSE"


class PackError(layout.DataLayoutError):
    """A pack cannot be made as asked (arguments, OUT, file names); the message says what to fix."""


# -- arguments -----------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.I)


def parse_size(value: str | int) -> int:
    """Bytes of ``512MB``, ``1GB``, ``64KB``, ``1MiB``, ``1.5GB`` or a plain number of bytes (KB,
    MB, GB: powers of 1000; KiB, MiB, GiB: of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise PackError(f"--shard-size={value!r} is not a size: give bytes or a number with a unit, "
                            f"e.g. 512MB, 1GB, 64KB, 1MiB")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1:
        raise PackError(f"--shard-size={value!r} must be at least 1 byte (e.g. 512MB)")
    return size


def _check_out(root: Path, out: Path) -> None:
    root_r, out_r = root.resolve(), out.resolve()
    if out_r == root_r:
        # ROOT/manifest.json would turn the tree itself into a "pack" for every reader.
        raise PackError(f"OUT={out} is ROOT itself: give the pack a folder of its own (e.g. {root_r}-shards)")
    for split in SPLITS:
        inside = root_r / split
        if out_r == inside or inside in out_r.parents:
            raise PackError(f"OUT={out} is inside {root / split}: the shards would be scanned as images "
                            f"of the tree; give a folder outside ROOT/train and ROOT/val")
    if out.exists() and not out.is_dir():
        raise PackError(f"OUT={out} exists and is not a folder")


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    path: str  # absolute: pack() makes ROOT absolute, so these equal the paths it decodes
    key: str
    label: int
    size: int
    mtime_ns: int
    # None: the image is the whole file ``path``; else its bytes are ``size`` bytes at ``offset``
    # of ``path`` (a member of an uncompressed tar, read in place: `imagenet-trainer prepare`).
    offset: int | None = None


@dataclass
class ShardPlan:
    """One shard to write: its images in order, and the bytes of tar they make."""

    out: str
    split: str
    number: int
    items: list[Item] = field(repr=False)
    bytes: int = 0

    @property
    def name(self) -> str:
        return pack_format.shard_name(self.split, self.number)

    @property
    def tar(self) -> str:
        return self.name + ".tar"

    @property
    def index(self) -> str:
        return self.name + ".idx"

    @cached_property
    def digest(self) -> str:
        # A byte range's offset is in its digest; a whole file's entry is as it was before ranges.
        text = json.dumps([WRITER, FORMAT, VERSION, [[i.path, i.key, i.label, i.size, i.mtime_ns]
                                                     + ([] if i.offset is None else [i.offset]) for i in self.items]])
        return hashlib.sha256(text.encode(ENCODING, ERRORS)).hexdigest()


def cut_shards(out: Path, split: str, items: list[Item], shard_size: int) -> list[ShardPlan]:
    """``items`` in order, cut into shards of at most ``shard_size`` bytes (at least one image each)."""
    shards: list[ShardPlan] = []
    members, current = 0, []
    for item in items:
        cost = pack_format.sample_bytes(item.key, item.size, item.label)
        if current and pack_format.tar_bytes(members + cost) > shard_size:
            shards.append(ShardPlan(str(out), split, len(shards), current, pack_format.tar_bytes(members)))
            members, current = 0, []
        members += cost
        current.append(item)
    if current:
        shards.append(ShardPlan(str(out), split, len(shards), current, pack_format.tar_bytes(members)))
    return shards


def check_keys(split: layout.Split, name: str) -> None:
    """Every file of ``split`` has its own key; a collision is an error naming both files."""
    seen: dict[str, str] = {}
    for path in split.files:
        key = sample_key(path)
        if key in seen:
            raise PackError(f"{seen[key]} and {path} both make the key {key!r} in {name}/ (a key is "
                            f"<class folder>/<file stem>, dots and spaces made _): rename one of them")
        seen[key] = path


def _items(split: layout.Split, bad: set[str]) -> list[Item]:
    """The split's good files as items, in listing order."""
    items = []
    for path, label in zip(split.files, split.labels):
        if path in bad:
            continue
        try:
            st = os.stat(path)
        except OSError as err:
            raise PackError(f"{path} cannot be read: {err.strerror or err}") from err
        items.append(Item(os.path.abspath(path), sample_key(path), int(label), st.st_size, st.st_mtime_ns))
    return items


# -- writing one shard (in a worker process) -----------------------------------------------------
# Temporary names: files.temp_path's unique ones (``.NAME.HOST.PID.RANDOM.tmp``), and the
# ``.NAME.tmpPID`` of packs before it.
_TMP = re.compile(r"^\..+\.tmp\d*$")


def _plan(out: Path, train: layout.Split, val: layout.Split, bad: set[str], seed: int, size: int) -> dict[str, list[ShardPlan]]:
    """The shards of each split: train images in the seeded order, val in listing order."""
    return plan_items(out, _items(train, bad), _items(val, bad), seed, size)


def plan_items(out: Path, train_items: list[Item], val_items: list[Item], seed: int, size: int) -> dict[str, list[ShardPlan]]:
    """The sample order of every pack (prepare's too, which is why their packs are byte-identical):
    train items in ``default_rng(seed).permutation`` of listing order, val in listing order, cut into shards."""
    order = np.random.default_rng(seed).permutation(len(train_items))
    return {"train": cut_shards(out, "train", [train_items[i] for i in order], size),
            "val": cut_shards(out, "val", val_items, size)}


def _checked_before(out: Path, train: layout.Split, val: layout.Split, seed: int,
                    size: int) -> tuple[set[str], dict[str, list[ShardPlan]] | None]:
    """Files that an earlier pack into ``out`` decoded: those of the shards whose record has the
    digest this plan gives them (assuming no bad file); and that plan (None when there is no
    earlier pack), which is the pack's plan when the check then finds no bad file. A record is written only after its shard,
    and a shard only after every image of the tree was decoded, and the digest covers each file's
    path, size and mtime: such a file has not changed since it was checked. So a resumed pack
    decodes only the images of the shards still to write (on ImageNet the check is most of a
    pack's time). Whether each kept shard's bytes are intact is checked later, by its sha256."""
    if not (out / STATE).is_dir():
        return set(), None
    known: set[str] = set()
    plan = _plan(out, train, val, set(), seed, size)
    for shard in (s for shards in plan.values() for s in shards):
        try:
            record = json.loads(_record_path(shard).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("plan") == shard.digest:
            known.update(item.path for item in shard.items)
    return known, plan


def _record_path(shard: ShardPlan) -> Path:
    return Path(shard.out) / STATE / (shard.name + ".json")


def _kept(shard: ShardPlan) -> dict | None:
    """The shard's record when the tar and index on disk are the ones it describes for this plan."""
    out = Path(shard.out)
    try:
        record = json.loads(_record_path(shard).read_text())
        if record.get("plan") != shard.digest or record.get("bytes") != shard.bytes:
            return None
        tar, index = out / shard.tar, out / shard.index
        if tar.stat().st_size != record["bytes"]:
            return None
        if files.sha256_of(index) != record["index_sha256"] or files.sha256_of(tar) != record["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def _write(shard: ShardPlan) -> dict:
    """Write the shard's tar and index (temporary names, fsync, rename), then its record."""
    out = Path(shard.out)
    _record_path(shard).unlink(missing_ok=True)
    lines = []
    # Each fsync'ed and renamed into place (the index first) as the block ends; removed on an error.
    with files.atomic_path(out / shard.tar, unique=True) as tmp_tar, \
            files.atomic_path(out / shard.index, unique=True) as tmp_index:
        with open(tmp_tar, "wb") as f:
            tar = _TarStream(f)
            for item in shard.items:
                members = pack_format.sample_members(item.key, _read(item), item.label)
                lines.append(pack_format.index_line([(ext, tar.member(name, data), len(data), name)
                                                     for ext, name, data in members]))
            tar.end()
        if tar.pos != shard.bytes:  # the plan's arithmetic and the writer disagree: a bug, not a user error
            raise RuntimeError(f"{shard.tar}: wrote {tar.pos} bytes, planned {shard.bytes}")
        index_text = pack_format.index_text(lines).encode(ENCODING, ERRORS)
        with open(tmp_index, "wb") as f:
            f.write(index_text)
    record = {"plan": shard.digest, "tar": shard.tar, "index": shard.index, "images": len(shard.items),
              "bytes": tar.pos, "sha256": tar.digest.hexdigest(), "index_sha256": hashlib.sha256(index_text).hexdigest()}
    write_atomic(_record_path(shard), json.dumps(record, indent=1).encode(), unique=True)
    _pause_if_asked(shard)
    return record


class _TarStream:
    """A tar being written to ``file``: ``pos`` counts its bytes, ``digest`` hashes them."""

    def __init__(self, file) -> None:
        self.file, self.digest, self.pos = file, hashlib.sha256(), 0

    def put(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.pos += len(data)

    def member(self, name: str, data: bytes) -> int:
        """Write the member ``name`` holding ``data``; returns the data's offset (the index's)."""
        self.put(pack_format.member_header(name, len(data)))
        offset = self.pos
        self.put(data)
        self.put(bytes(pack_format.pad(len(data)) - len(data)))
        return offset

    def end(self) -> None:
        """The end-of-archive blocks and the padding to a whole record."""
        self.put(bytes(pack_format.tar_bytes(self.pos) - self.pos))


def _read(item: Item) -> bytes:
    """The image file's bytes, as listed (same size and mtime), or a :class:`PackError`."""
    if item.offset is not None:
        return read_range(item)
    try:
        with open(item.path, "rb") as source:
            st = os.fstat(source.fileno())
            data = source.read()
    except OSError as err:
        raise PackError(f"{item.path} cannot be read: {err.strerror or err}") from err
    if (len(data), st.st_mtime_ns) != (item.size, item.mtime_ns):
        raise PackError(f"{item.path} changed while packing ({item.size} bytes when listed, "
                        f"{len(data)} now, modified since): run pack again")
    return data


_range_files: dict[str, int] = {}  # path -> an open descriptor, kept per process (an archive is read many times)


def close_ranges() -> None:
    """Close the descriptors :func:`read_range` keeps (a later run may read replaced files)."""
    while _range_files:
        os.close(_range_files.popitem()[1])


def read_range(item: Item) -> bytes:
    """The ``size`` bytes at ``offset`` of ``path`` (whose mtime must be as listed), or a :class:`PackError`."""
    try:
        fd = _range_files.get(item.path)
        if fd is None:
            if len(_range_files) >= 16:
                os.close(_range_files.pop(next(iter(_range_files))))
            fd = _range_files[item.path] = os.open(item.path, os.O_RDONLY)
        mtime_ns = os.fstat(fd).st_mtime_ns
        data = os.pread(fd, item.size, item.offset)
    except OSError as err:
        raise PackError(f"{item.path} cannot be read: {err.strerror or err}") from err
    if (len(data), mtime_ns) != (item.size, item.mtime_ns):
        raise PackError(f"{item.path} changed while packing (modified since it was listed, or shorter than "
                        f"{item.offset + item.size} bytes): run again")
    return data


def _pause_if_asked(shard: ShardPlan) -> None:
    """The ``PAUSE_ENV`` test hook: note the shard as written, then wait to be killed."""
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        with open(pause, "a") as f:
            f.write(shard.name + "\n")
        while True:  # until the test kills the pack (the workers die with it)
            time.sleep(60)


def _do_shard(shard: ShardPlan) -> tuple[dict, bool]:
    """(the shard's record, whether it was kept from an earlier run)."""
    record = _kept(shard)
    if record is not None:
        return record, True
    return _write(shard), False


def _worker_init(parent: int) -> None:
    """Die with the pack: a worker left writing after its pack was killed would race the next one."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _run_shards(shards: list[ShardPlan], workers: int):
    """(shard, record, kept) for every shard, as they finish."""
    if workers <= 1 or len(shards) <= 1:
        for shard in shards:
            yield (shard, *_do_shard(shard))
        return
    ctx = multiprocessing.get_context("spawn")  # as check.py: the caller may hold threads fork cannot copy
    with ProcessPoolExecutor(min(workers, len(shards)), mp_context=ctx, initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_do_shard, shard): shard for shard in shards}
        try:
            for future in as_completed(futures):
                yield (futures[future], *future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# -- OUT -----------------------------------------------------------------------------------------
_SHARD_FILE = {".": pack_format.SHARD_FILE,  # in OUT
               STATE: re.compile(r"^(train|val)-(\d{6})\.json$")}  # in OUT/.pack


def _lock(out: Path, verb: str = "pack"):
    state = out / STATE
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PackError(f"another `imagenet-trainer {verb}` is writing {out} (it holds {state / 'lock'}); "
                        f"wait for it or stop it") from None
    return fd


def _clean(out: Path, counts: dict[str, int]) -> None:
    """Remove the manifest (the pack is incomplete until it is written again), stale temporary
    files, and the shards and records beyond the plan's."""
    (out / MANIFEST).unlink(missing_ok=True)
    for sub, pattern in _SHARD_FILE.items():
        for entry in os.scandir(out / sub):
            match = pattern.match(entry.name)
            if _TMP.match(entry.name) and entry.is_file():
                os.unlink(entry.path)
            elif match and int(match.group(2)) >= counts[match.group(1)]:
                os.unlink(entry.path)
    files.fsync_dir(out)


# -- the whole pack ------------------------------------------------------------------------------
@dataclass
class PackResult:
    out: Path
    manifest: dict | None  # None when bad files stopped the pack (nothing written)
    bad: list[tuple[str, str]]  # (path, reason) of every file that does not decode
    files: int = 0  # image files under ROOT/train and ROOT/val, bad ones included
    images: dict[str, int] = field(default_factory=dict)
    shards: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    kept: int = 0
    written: int = 0
    check_seconds: float = 0.0
    write_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.manifest is not None


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(f"pack: {message}", file=sys.stderr, flush=True)


def pack(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    verbose: bool = False,
) -> PackResult:
    """Pack the tree ``root`` into ``out`` (see the module docstring); resumes a killed pack.

    Raises :class:`PackError` (or :class:`layout.DataLayoutError`) for bad arguments or a tree that
    is not an ImageNet layout. Bad files: the result's ``bad``; without ``skip_bad`` nothing is
    written and the result's ``manifest`` is None. ``progress``: bars on stderr (default: when it
    is a terminal); ``verbose``: what it does, on stderr.
    """
    # Absolute once, here: the records' digests hold absolute paths, and the files to decode are
    # matched against them (a relative ROOT made a resume decode every image again).
    root, out = Path(os.path.abspath(root)), Path(out)
    size = parse_size(shard_size)
    workers = check.default_workers() if workers is None else max(0, int(workers))
    if progress is None:
        progress = sys.stderr.isatty()
    if not root.is_dir():
        raise PackError(f"ROOT={root} does not exist or is not a folder: give the folder that holds train/ and val/")
    train, val = layout.scan_dataset(root)
    _check_out(root, out)
    check_keys(train, "train")
    check_keys(val, "val")

    start = time.perf_counter()
    bad, earlier_plan = _decode_all(root, out, train, val, seed, size, workers, progress, verbose)
    result = PackResult(out, None, bad, len(train) + len(val), check_seconds=time.perf_counter() - start)
    if bad and not skip_bad:
        return result

    start = time.perf_counter()
    # Without bad files the plan is the one _checked_before made (each file stat'ed once).
    plan = earlier_plan if earlier_plan is not None and not bad else _plan(out, train, val, {p for p, _ in bad}, seed, size)
    if not plan["train"]:
        raise PackError(f"no train image of {root} decodes: nothing to pack")
    shards = plan["train"] + plan["val"]

    out.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        _clean(out, {name: len(plan[name]) for name in SPLITS})
        _say(verbose, f"writing {len(plan['train'])} train and {len(plan['val'])} val shard(s) of at most "
                      f"{size} bytes into {out}, {min(max(workers, 1), len(shards))} worker(s)")
        records = _write_shards(shards, workers, result, progress, verbose)
        manifest = pack_format.manifest(
            classes=train.classes, source_root=str(root.resolve()), seed=seed, shard_size=size,
            splits={name: [records[s.name] for s in plan[name]] for name in SPLITS},
            skipped=[{"path": os.path.abspath(p), "reason": r} for p, r in bad],
            names=layout.read_names(root, train.classes),
        )
        write_atomic(out / MANIFEST, pack_format.manifest_bytes(manifest), unique=True)
    finally:
        os.close(lock)
    result.manifest = manifest
    result.write_seconds = time.perf_counter() - start
    result.images = {name: manifest["splits"][name]["images"] for name in SPLITS}
    result.shards = {name: len(plan[name]) for name in SPLITS}
    result.bytes = sum(s.bytes for s in shards)
    return result


def _decode_all(root: Path, out: Path, train: layout.Split, val: layout.Split, seed: int, size: int, workers: int,
                progress: bool, verbose: bool) -> tuple[list[tuple[str, str]], dict[str, list[ShardPlan]] | None]:
    """Step 1's decoding: ``(path, reason)`` of every bad file among those no earlier pack of the
    same plan decoded, and that earlier pack's plan (:func:`_checked_before`)."""
    files = train.files + val.files
    known, earlier_plan = _checked_before(out, train, val, seed, size)
    todo = [f for f in files if f not in known]
    if len(todo) < len(files):  # counted on what is decoded, so the log cannot claim a skip that did not happen
        _say(verbose, f"{len(files) - len(todo)} of the {len(files)} images are in shards an earlier pack of the "
                      f"same plan finished: decoded then, not again")
    how = "Pillow and nvImageCodec (DALI's decoder)" if check.dali_decoder_available() else "Pillow only"
    _say(verbose, f"decoding {len(todo)} of the {len(files)} images under {root} ({len(train)} train, {len(val)} val) "
                  f"with {how}, {workers} worker(s)")
    return check.check_files(todo, workers, progress=progress), earlier_plan


def _write_shards(shards: list[ShardPlan], workers: int, result: PackResult, progress: bool,
                  verbose: bool) -> dict[str, dict]:
    """Step 3 for every shard (kept or written), counted in ``result``: each shard's record, by name."""
    records: dict[str, dict] = {}
    bar = progress_bar(sum(len(s.items) for s in shards)) if progress else None
    try:
        for shard, record, kept in _run_shards(shards, workers):
            records[shard.name] = record
            result.kept += kept
            result.written += not kept
            if bar is not None:
                bar.update(len(shard.items))
            elif len(shards) >= 20 and len(records) * 10 // len(shards) > (len(records) - 1) * 10 // len(shards):
                _say(verbose, f"{len(records)}/{len(shards)} shards done")  # a line per tenth
    finally:
        if bar is not None:
            bar.close()
    return records


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def main(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard_size: str | int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    skip_bad: bool = False,
    seed: int = 0,
) -> int:
    """The ``pack`` verb: 0 when the pack is complete, 1 when bad files stopped it (each printed as
    ``path: reason`` on stdout, nothing written), 2 for bad arguments or a tree that is not an
    ImageNet layout (``pack: <message>`` on stderr)."""
    try:
        result = pack(root, out, shard_size=shard_size, workers=workers, skip_bad=skip_bad, seed=seed, verbose=True)
    except (layout.DataLayoutError, OSError) as err:
        print(f"pack: {err}", file=sys.stderr)
        return 2
    for path, reason in result.bad:
        print(f"{path}: {reason}")
    if not result.ok:
        print(f"pack: {len(result.bad)} of {result.files} images are bad; nothing was written to {out}. Replace or "
              f"delete them, or pass --skip-bad to pack the others (the manifest lists the ones left out)",
              file=sys.stderr)
        return 1
    if result.bad:
        print(f"pack: left out {len(result.bad)} bad image(s) (--skip-bad); manifest.json lists them under "
              f"'skipped'", file=sys.stderr)
    seconds = result.check_seconds + result.write_seconds
    images = sum(result.images.values())
    _say(True, f"kept {result.kept} finished shard(s) of an earlier run (verified), wrote {result.written}")
    _say(True, f"done: train {result.images['train']} images in {result.shards['train']} shard(s), val "
               f"{result.images['val']} images in {result.shards['val']} shard(s), {_human(result.bytes)} "
               f"({result.bytes} bytes); {images / max(seconds, 1e-9):.0f} images/s (check "
               f"{result.check_seconds:.1f} s, write {result.write_seconds:.1f} s); {Path(out) / MANIFEST}")
    return 0
