"""Find every image a training run would fail on, before the run (``imagenet-trainer check-data``).

Each file is decoded twice, in parallel worker processes: by Pillow, as the torchvision backend
does (``Image.open(f).convert("RGB")``), and by nvImageCodec, the library DALI decodes with, on the
CPU. A file either rejects is reported with the reason. Unusual but valid files (CMYK or grayscale
JPEGs, a PNG named ``.JPEG``, progressive or EXIF-rotated JPEGs; ImageNet has all of them) decode
to RGB in both and are not reported. A 500x375 JPEG costs about 5 ms of one core for both decodes
(Pillow 3.5, nvImageCodec 1.7), so checking ImageNet's 1.33M files takes about 4 minutes on a
32-core node, more when the filesystem is the bottleneck.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from . import layout

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
    bar = _progress_bar(len(files)) if progress else None
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


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total)
    return tqdm(total=total, unit="img", file=sys.stderr, smoothing=0.1)


class _Counter:
    """A progress line for when tqdm is missing."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def update(self, n: int) -> None:
        self.done += n
        if self.done % 1000 == 0 or self.done == self.total:
            print(f"\r{self.done}/{self.total} images", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


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
    from . import shards

    try:
        manifest = shards.read_manifest(root)
    except shards.ShardError as err:
        print(f"check-data: {err}", file=sys.stderr)
        return 1 if (Path(root) / shards.MANIFEST).is_file() else 2
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


# -- naming the bad file when a DALI pipeline fails on one (used by data_pipelines/dali.py) -------

def is_data_error(err: RuntimeError) -> bool:
    """A failure of the reader or a decoder while running (not, say, a build error)."""
    text = str(err)
    return "fn.readers.file" in text or "fn.readers.webdataset" in text or "fn.decoders." in text


def _dali_reason(message: str) -> str:
    """The line of DALI's error that says what went wrong (DALI prints a graph traceback first)."""
    tail = message.split("encountered:", 1)[-1].strip().splitlines()
    useful = [ln for ln in tail if ln.strip() and "no longer valid" not in ln and "C++ context" not in ln]
    return useful[0].strip() if useful else message.strip().splitlines()[0]


# How DALI 2.4 names a file: "Failed to decode sample #3 : PATH" (decoders), "File mapping
# failed: PATH" (reader, empty or unreadable file).
_NAMED_FILE = re.compile(r"(?:Failed to decode sample #\d+ : |File mapping failed: )(.+?)\s*$", re.M)


def bad_file_message(message: str, in_flight: Sequence[str], all_files: Sequence[str]) -> str:
    """A message naming the file(s) DALI failed on, taken from its error or found by decoding the
    ``in_flight`` files again; it always says how to find every bad file at once."""
    reason = _dali_reason(message)
    named = [m.group(1) for m in _NAMED_FILE.finditer(message)]
    named += [p for p in in_flight if p in message]
    # Decode a named file again for a reason that says more than DALI's "failed to decode".
    found = [(p, check_file(p) or f"DALI: {reason}") for p in dict.fromkeys(named)]
    if not found:
        found = check_files(list(dict.fromkeys(in_flight)), num_workers=0, progress=False)
    if found:
        listing = "\n".join(f"  {p}: {r}" for p, r in found)
        head = f"DALI could not read or decode {len(found)} image file(s):\n{listing}\n"
    else:
        head = (
            f"DALI failed and did not name the file; the {len(in_flight)} files of the batches in "
            f"flight all decode when read again, so the cause may be I/O or memory.\n"
        )
    return (
        f"{head}The run stopped: DALI cannot skip a sample, and nothing is skipped silently. "
        f"Run `imagenet-trainer check-data {_dataset_root(all_files)}` to list every bad file, then "
        f"replace or remove them. DALI said: {reason}"
    )


def _dataset_root(files: Sequence[str]) -> str:
    """The dataset root for the check-data hint: the folder above train/ or val/ when there is one."""
    if not files:
        return "ROOT"
    try:
        common = os.path.commonpath([files[0], files[-1]])
    except ValueError:
        return "ROOT"
    parts = common.split(os.sep)
    for split in ("train", "val"):
        if split in parts:
            return os.sep.join(parts[: len(parts) - 1 - parts[::-1].index(split)]) or os.sep
    return common
