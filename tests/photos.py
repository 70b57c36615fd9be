"""Photo-like JPEGs for tests and benchmarks: one generator, so that every test and benchmark writes
the same kind of image.

Unlike the sample dataset's shapes (data_pipelines/sample.py, made to be learnable), these images
are made to cost what ImageNet's cost: smooth colour fields, mid-frequency texture and sensor-like
noise, so that JPEG sizes (about 80 KB at 500x375, quality 90) and decode times resemble real photos.

    photo(rng, width, height)                    # a PIL image
    write_jpeg(path, rng, width, height)         # one file
    write_tree(root, "train", classes=8, num_images=512, workers=8)   # ROOT/train/<wnid>/*.JPEG

Everything is a function of its seed: the same arguments write the same bytes.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (width, height)

# ImageNet's two commonest shapes: three landscape 500x375 to one portrait 375x500.
IMAGENET_SIZES: tuple[Size, ...] = ((500, 375), (500, 375), (500, 375), (375, 500))


def photo(rng: np.random.Generator | int, width: int, height: int, *, mode: str = "RGB") -> Image.Image:
    """A ``width`` x ``height`` photo-like image: smooth colour fields, mid-frequency texture and
    sensor-like noise. ``rng``: a generator (advanced) or a seed. ``mode``: a Pillow mode to convert
    to ("L" for grayscale, "CMYK", ...)."""
    rng = np.random.default_rng(rng)  # a Generator passes through unchanged
    small = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
    texture = rng.integers(0, 256, (max(1, height // 3), max(1, width // 3)), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(texture).resize((width, height), Image.BILINEAR), np.float32)
    pixels += (texture[..., None] - 128) * 0.4 + rng.normal(0, 9, pixels.shape)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def write_jpeg(path: str | Path, rng: np.random.Generator | int, width: int, height: int, quality: int = 90, *,
               mode: str = "RGB", **options) -> Path:
    """Write ``photo(rng, width, height, mode=mode)`` to ``path`` as a JPEG (parent folders made).
    ``options`` go to Pillow's JPEG writer (``progressive=True``, ``exif=...``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(rng, width, height, mode=mode).save(path, "JPEG", quality=quality, **options)
    return path


def _sizes(sizes: Size | Sequence[Size]) -> list[Size]:
    if len(sizes) == 2 and all(isinstance(v, (int, np.integer)) for v in sizes):
        return [(int(sizes[0]), int(sizes[1]))]
    return [(int(w), int(h)) for w, h in sizes]


def _write_task(task: tuple[str, tuple[int, int], int, int, int]) -> None:
    path, seed, width, height, quality = task
    write_jpeg(path, np.random.default_rng(seed), width, height, quality)


def write_tree(
    root: str | Path,
    split: str = "train",
    *,
    classes: int | Sequence[str],
    num_images: int | None = None,
    per_class: int | None = None,
    sizes: Size | Sequence[Size] = IMAGENET_SIZES,
    seed: int = 0,
    quality: int = 90,
    unique: int | None = None,
    workers: int = 1,
) -> list[Path]:
    """Write ``root/<split>/<wnid>/img_<i>.JPEG`` for images i = 0 .. ``num_images`` - 1 (or
    ``per_class`` images per class), as ImageNet lays them out; returns their paths, in order of i.

    ``classes``: a number (folders n00000000, n00000001, ...) or the folder names. Image i is in
    class ``i % len(classes)`` and has size ``sizes[i % len(sizes)]`` (width, height; one pair or
    several; the default is three landscape 500x375 to one portrait 375x500). Each image has its
    own seed (``seed``, i), so the files do not depend on ``workers``.

    ``unique``: write only that many distinct photos and hard-link the others to them (image i is
    image ``i % unique``; copied where links fail): a large tree for the price of a few photos.
    ``workers`` > 1 writes in a pool of forked processes: start CUDA only after this returns
    (a forked child of a process with CUDA started cannot use it, and may hang).
    """
    if (num_images is None) == (per_class is None):
        raise ValueError("write_tree: give exactly one of num_images and per_class")
    names = [f"n{c:08d}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    if not names:
        raise ValueError("write_tree: no classes")
    total = num_images if num_images is not None else per_class * len(names)
    shapes = _sizes(sizes)
    distinct = total if unique is None else max(1, min(unique, total))
    folder = Path(root) / split
    for name in names[: max(total, 0)]:
        (folder / name).mkdir(parents=True, exist_ok=True)
    paths = [folder / names[i % len(names)] / f"img_{i:07d}.JPEG" for i in range(total)]
    tasks = [(str(paths[i]), (seed, i), *shapes[i % len(shapes)], quality) for i in range(distinct)]
    if workers > 1 and distinct > 16:
        # fork: cheap, and the parent's imports come along; the caller has not started CUDA (above).
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_write_task, tasks, chunksize=8)
    else:
        for task in tasks:
            _write_task(task)
    for i in range(distinct, total):
        try:
            os.link(paths[i % distinct], paths[i])
        except OSError:
            shutil.copyfile(paths[i % distinct], paths[i])
    return paths
