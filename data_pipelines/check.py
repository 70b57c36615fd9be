"""Find every image a training run would fail on, before the run (``imagenet-trainer check-data``).

Each file is decoded twice, in parallel worker processes: by Pillow, as the torchvision backend
does (``Image.open(f).convert("RGB")``), and by nvImageCodec, the library DALI decodes with, on the
CPU. A file either rejects is reported with the reason. Unusual but valid files (CMYK or grayscale
JPEGs, a PNG named ``.JPEG``, progressive or EXIF-rotated JPEGs; ImageNet has all of them) decode
to RGB in both and are not reported. A 500x375 JPEG costs about 5 ms of one core for both decodes
(Pillow 3.5, nvImageCodec 1.7), so checking ImageNet's 1.33M files takes about 4 minutes on a
32-core node, more when the filesystem is the bottleneck.

The same decoding names the bad images when a DALI pipeline fails on one
(:meth:`data_pipelines.sources.Source.dali_failure`).
"""
from __future__ import annotations

import io
import multiprocessing
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import layout
from .progress import progress_bar

_decoder = None  # one nvImageCodec decoder per worker process; False when unavailable


def _nvimgcodec_decoder():
    global _decoder
    if _decoder is None:
        # nvImageCodec logs every failure to stderr; the report says it once, better.
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
        try:
            import nvidia.nvimgcodec as nvimgcodec

            _decoder = nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                max_num_cpu_threads=1,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
            )
        except Exception:  # not installed (torchvision-only setups) or no usable backend
            _decoder = False
    return _decoder


def dali_decoder_available() -> bool:
    """Whether files are also decoded the way DALI decodes them (nvImageCodec imports)."""
    return bool(_nvimgcodec_decoder())


def check_file(path: str) -> str | None:
    """Why ``path`` cannot be used as a training image, or None when it decodes to RGB."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    return check_bytes(data)


def check_bytes(data: bytes) -> str | None:
    """Why the encoded image ``data`` cannot be used for training, or None when it decodes to RGB
    with Pillow and with DALI's decoder (the files of a tree, the images inside a pack's shards)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file (0 bytes)"
    max_pixels, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # huge is not broken
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            image.convert("RGB").load()
    except UnidentifiedImageError:
        return f"not an image ({len(data)} bytes starting {data[:8]!r}): Pillow cannot identify it"
    except Exception as err:  # truncated, corrupt: Pillow raises OSError, SyntaxError, ValueError...
        return f"Pillow cannot decode it: {err}"
    finally:
        Image.MAX_IMAGE_PIXELS = max_pixels
    decoder = _nvimgcodec_decoder()
    if decoder:
        try:
            decoded = decoder.decode(data)
        except Exception as err:
            decoded, detail = None, f": {err}"
        else:
            detail = ""
        if decoded is None:
            return f"DALI's decoder (nvImageCodec) cannot decode this {fmt} file{detail}"
    return None


def _check_indexed(item: tuple[int, str]) -> tuple[int, str | None]:
    return item[0], check_file(item[1])


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_files(
    files: Sequence[str], num_workers: int | None = None, *, progress: bool | None = None
) -> list[tuple[str, str]]:
    """``(path, reason)`` for every file of ``files`` that does not decode, in input order.

    ``num_workers`` processes decode in parallel (0: in this process; None: one per CPU core);
    a progress bar goes to stderr when ``progress`` (default: stderr is a terminal).
    """
    files = [str(f) for f in files]
    if num_workers is None:
        num_workers = default_workers()
    if progress is None:
        progress = sys.stderr.isatty()
    bar = progress_bar(len(files)) if progress else None
    results: dict[int, str] = {}
    try:
        for i, reason in _run(files, num_workers):
            if reason is not None:
                results[i] = reason
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [(files[i], results[i]) for i in sorted(results)]


def _run(files: list[str], num_workers: int) -> Iterable[tuple[int, str | None]]:
    items = list(enumerate(files))
    if num_workers <= 1 or len(files) < 2 * num_workers:
        yield from map(_check_indexed, items)
        return
    # spawn, not fork: the caller may hold CUDA, DALI or torch threads, which fork does not
    # survive. An executor, not a Pool: a worker that dies raises BrokenProcessPool instead of
    # hanging the check.
    ctx = multiprocessing.get_context("spawn")
    chunk = max(1, min(256, len(files) // (num_workers * 16)))
    with ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
        yield from pool.map(_check_indexed, items, chunksize=chunk)


def check_tree(root: str | os.PathLike, num_workers: int | None = None, *, progress: bool | None = None):
    """``(path, reason)`` for every bad image under ``root/train`` and ``root/val``."""
    train, val = layout.scan_dataset(root)
    return check_files(train.files + val.files, num_workers, progress=progress)


def main(root: str | os.PathLike, num_workers: int | None = None) -> int:
    """The ``check-data`` verb: one line per bad file (``path: reason``) on stdout, a summary on
    stderr; returns 0 when every image decodes, 1 when some do not, 2 when the tree is not an
    ImageNet layout. ``root`` a pack (``imagenet-trainer pack``'s output): every shard is checked
    against the manifest instead (present, its size, its sha256), since pack decoded each image."""
    from . import shards

    if shards.is_sharded(root):
        return _check_pack(root, num_workers)
    try:
        train, val = layout.scan_dataset(root)
    except layout.DataLayoutError as err:
        print(f"check-data: {err}", file=sys.stderr)
        return 2
    files = train.files + val.files
    workers = default_workers() if num_workers is None else num_workers
    how = "Pillow and nvImageCodec (DALI's decoder)" if dali_decoder_available() else "Pillow only"
    print(
        f"check-data: decoding {len(files)} images under {root} ({len(train)} train, {len(val)} val) "
        f"with {how}, {workers} worker(s)",
        file=sys.stderr,
    )
    bad = check_files(files, workers)
    for path, reason in bad:
        print(f"{path}: {reason}")
    if bad:
        print(
            f"check-data: {len(bad)} of {len(files)} images are bad; replace or delete them "
            f"(a training run stops at the first one it meets)",
            file=sys.stderr,
        )
        return 1
    print(f"check-data: all {len(files)} images decode", file=sys.stderr)
    return 0


def _check_pack(root: str | os.PathLike, num_workers: int | None) -> int:
    from . import pack_format, shards

    try:
        manifest = shards.read_manifest(root)
    except shards.ShardError as err:
        print(f"check-data: {err}", file=sys.stderr)
        return 1 if (Path(root) / pack_format.MANIFEST).is_file() else 2
    every = manifest.shards()
    print(f"check-data: {root} is a pack of {len(every)} shards ({len(manifest.train)} train, {len(manifest.val)} val "
          f"images); checking each shard's sha256 against manifest.json (pack decoded every image)", file=sys.stderr)
    bad = shards.verify(manifest, default_workers() if num_workers is None else num_workers)
    for path, reason in bad:
        print(f"{path}: {reason}")
    if bad:
        print(f"check-data: {len(bad)} of {len(every)} shards are damaged; copy them again from a good copy, or "
              f"re-run `imagenet-trainer pack` (it rewrites shards that do not match their records)", file=sys.stderr)
        return 1
    print(f"check-data: all {len(every)} shards match the manifest", file=sys.stderr)
    return 0
