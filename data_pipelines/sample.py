"""A small ImageNet-layout JPEG tree whose classes are learnable but not trivial.

Each class is a (shape, colour) pair drawn on a noisy background of random tint, at a random
position, size and rotation, with a distractor shape of another class's kind. A network must look
at both the shape and its colour to tell classes apart, so a pipeline that scrambles labels,
colours or geometry cannot reach a high top-1 (see the thresholds in tests/test_fit.py).
The tree is a function of the seed: the same arguments write the same files.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .layout import NAMES_FILE

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}


def class_names(num_classes: int) -> list[tuple[str, str, str]]:
    """(wnid-like folder name, shape, colour) for each class, in a fixed order."""
    pairs = [(s, c) for c in COLOURS for s in SHAPES]
    # Interleave so that the first classes already differ in both shape and colour.
    rng = np.random.default_rng(1234)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    if not 2 <= num_classes <= len(pairs):
        raise ValueError(f"num_classes={num_classes} must be between 2 and {len(pairs)}")
    return [(f"n{i:08d}", s, c) for i, (s, c) in enumerate(pairs[:num_classes])]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points):
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]

    if shape == "square":
        return rot([(-r, -r), (r, -r), (r, r), (-r, r)])
    if shape == "triangle":
        return rot([(r * math.cos(t), r * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    if shape == "bar":
        return rot([(-r, -r / 3), (r, -r / 3), (r, r / 3), (-r, r / 3)])
    if shape == "cross":
        w = r / 3
        return rot([(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
                    (-r, w), (-r, -w), (-w, -w)])
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour, cx: float, cy: float, r: float, angle: float) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=colour)


def render(shape: str, colour: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One image of class (shape, colour)."""
    w, h = size
    tint = rng.integers(60, 200, size=3)
    noise = rng.normal(0, 28, size=(h, w, 3))
    img = Image.fromarray(np.clip(tint + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # A distractor of a random shape in a random grey, so "is there a shape" is not the answer.
    distractor = SHAPES[rng.integers(len(SHAPES))]
    grey = tuple(int(v) for v in rng.integers(30, 230, size=1).repeat(3))
    s = min(w, h)
    _draw(draw, distractor, grey, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.08, 0.15) * s,
          rng.uniform(0, 2 * math.pi))
    base = np.array(COLOURS[colour])
    jittered = tuple(int(v) for v in np.clip(base + rng.normal(0, 18, size=3), 0, 255))
    r = rng.uniform(0.18, 0.32) * s
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    _draw(draw, shape, jittered, cx, cy, r, rng.uniform(0, 2 * math.pi))
    return img


def make_sample_tree(
    root: str | Path,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    image_size: tuple[int, int] = (80, 64),
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG; returns ROOT.

    ``image_size`` is (width, height); sizes vary by up to 20% per image, as real photos do.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for wnid, shape, colour in class_names(num_classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w = int(image_size[0] * rng.uniform(0.85, 1.2))
                h = int(image_size[1] * rng.uniform(0.85, 1.2))
                img = render(shape, colour, (w, h), rng)
                img.save(folder / f"{wnid}_{i}.JPEG", quality=quality)
    # The classes' words, as a tree names them (layout.NAMES_FILE): they travel into checkpoints and predict.
    (root / NAMES_FILE).write_text(
        "".join(f"{wnid} {colour} {shape}\n" for wnid, shape, colour in class_names(num_classes))
    )
    return root
