"""Small models and evaluation sets for the tests of ``evaluate`` and ``inference``, in the real
layouts (real JPEGs, real files):

    model_file(path, classes)             # a resnet18 export (.pt + .json sidecar) for those classes
    val_tree(root, classes, per_class)    # root/<wnid>/ILSVRC2012_val_%08d.JPEG, numbered in order
    real_json(path, lists)                # ReaL's real.json
    v2_tree(root, indices, per_class)     # root/<class index>/*.jpeg (ImageNet-V2)
    wnid_tree(root, wnids, per_class)     # root/<wnid>/*.JPEG (sketch, A, R)
    c_tree(root, corruptions, severities, wnids, per_class)   # root/<corruption>/<severity>/<wnid>/
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from tests.photos import write_jpeg

CROP, RESIZE = 32, 36  # the test models' preprocessing


def wnids(n: int) -> list[str]:
    """``n`` sorted synthetic wnids, n0000000i (ImageNet-1k's have this shape and sort order)."""
    return [f"n{i:08d}" for i in range(n)]


def model_file(path: Path, classes: Sequence[str], seed: int = 0, resize: int = RESIZE, crop: int = CROP) -> Path:
    """A resnet18 for ``classes`` (random weights, seeded) written as ``imagenet-trainer export``
    writes a torchvision export: ``path`` (.pt) and its sidecar."""
    from trainer.artifacts.export import preprocessing, sidecar_path
    from trainer.recipe.models import build_model

    torch.manual_seed(seed)
    model = build_model("resnet18", len(classes))
    # Random BN statistics, so that images give distinct logits (fresh BN is nearly the identity).
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    meta = {"format": "torchvision", "arch": "resnet18", "num_classes": len(classes), "blurpool": False,
            "classes": list(classes), "preprocessing": preprocessing(resize, crop), "weights": "raw",
            "torchvision_builder": "torchvision.models.resnet18", "source": {"checkpoint": "tests"}}
    sidecar_path(path).write_text(json.dumps(meta))
    return path


def _size(i: int) -> tuple[int, int]:
    return ((48, 40), (40, 52), (44, 44))[i % 3]


def val_tree(root: Path, classes: Sequence[str], per_class: int, seed: int = 1) -> list[Path]:
    """ImageNet's val tree: image number i (1-based, ``ILSVRC2012_val_%08d.JPEG``) is in class
    ``(i - 1) % len(classes)``; returns the files in number order."""
    files = []
    for i in range(1, per_class * len(classes) + 1):
        wnid = classes[(i - 1) % len(classes)]
        files.append(write_jpeg(root / wnid / f"ILSVRC2012_val_{i:08d}.JPEG", (seed, i), *_size(i)))
    return files


def real_json(path: Path, lists: Sequence[Sequence[int]]) -> Path:
    path.write_text(json.dumps([list(x) for x in lists]))
    return path


def v2_tree(root: Path, indices: Sequence[int], per_class: int, seed: int = 2) -> dict[int, list[Path]]:
    """ImageNet-V2: ``root/<class index>/<hash>.jpeg``."""
    out: dict[int, list[Path]] = {}
    for index in indices:
        out[index] = [write_jpeg(root / str(index) / f"{index:04d}{j:036d}.jpeg", (seed, index, j), *_size(j))
                      for j in range(per_class)]
    return out


def wnid_tree(root: Path, names: Sequence[str], per_class: int, seed: int = 3, size=None) -> list[Path]:
    files = []
    for c, wnid in enumerate(names):
        for j in range(per_class):
            files.append(write_jpeg(root / wnid / f"img_{j:04d}.JPEG", (seed, c, j), *(size or _size(j))))
    return files


def c_tree(root: Path, corruptions: Sequence[str], severities: Sequence[int], names: Sequence[str],
           per_class: int, size: int = CROP) -> list[Path]:
    """ImageNet-C: ``root/<corruption>/<severity>/<wnid>/*.JPEG``, square images of ``size``."""
    files = []
    for k, corruption in enumerate(corruptions):
        for severity in severities:
            files += wnid_tree(root / corruption / str(severity), names, per_class, seed=100 + 10 * k + severity,
                               size=(size, size))
    return files
