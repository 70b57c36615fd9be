"""The shared photo-like JPEGs (tests/photos.py) of the tests and benchmarks: the layout
asked for, ImageNet-like file sizes, and the same bytes for the same seed."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines.layout import scan_split
from tests import photos


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.JPEG"))}


def test_tree_has_the_layout_counts_classes_and_sizes_asked(tmp_path):
    paths = photos.write_tree(tmp_path, "train", classes=3, num_images=8, sizes=[(40, 30), (30, 40)])
    assert len(paths) == 8 and all(p.suffix == ".JPEG" and p.parent.parent == tmp_path / "train" for p in paths)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["n00000000", "n00000001", "n00000002"]
    assert [len(list((tmp_path / "train" / c).iterdir())) for c in ("n00000000", "n00000001", "n00000002")] == [3, 3, 2]
    for i, path in enumerate(paths):
        assert path.parent.name == f"n{i % 3:08d}"
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == ((40, 30) if i % 2 == 0 else (30, 40))
    split = scan_split(tmp_path, "train")  # what the trainer reads
    assert len(split) == 8 and split.classes == ["n00000000", "n00000001", "n00000002"]

    val = photos.write_tree(tmp_path, "val", classes=["b", "a"], per_class=2, sizes=(16, 12))
    assert sorted(p.relative_to(tmp_path).parent.as_posix() for p in val) == ["val/a", "val/a", "val/b", "val/b"]
    for path in val:
        with Image.open(path) as img:
            assert img.size == (16, 12)


def test_unique_photos_are_linked_up_to_the_total(tmp_path):
    paths = photos.write_tree(tmp_path, classes=2, num_images=7, unique=3, sizes=(24, 24))
    assert len(paths) == len(set(paths)) == 7 and all(p.is_file() for p in paths)
    assert len({p.read_bytes() for p in paths}) == 3
    for i, path in enumerate(paths):
        assert path.read_bytes() == paths[i % 3].read_bytes()
        assert path.parent.name == f"n{i % 2:08d}"


def test_imagenet_sized_jpegs_are_imagenet_like_in_bytes(tmp_path):
    """ImageNet's train JPEGs average about 110 KB (at about 400x350 mean size, mostly 500x375)."""
    sizes = [os.path.getsize(photos.write_jpeg(tmp_path / f"{seed}.JPEG", seed, 500, 375, quality=90))
             for seed in range(6)]
    assert all(30_000 < s < 150_000 for s in sizes), sizes


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = photos.write_tree(tmp_path / "a", classes=2, num_images=4, sizes=(48, 40), seed=5)
    b = photos.write_tree(tmp_path / "b", classes=2, num_images=40, sizes=(48, 40), seed=5, unique=20, workers=2)
    c = photos.write_tree(tmp_path / "c", classes=2, num_images=4, sizes=(48, 40), seed=6)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b[:4]]  # workers do not change the files
    assert _tree_bytes(tmp_path / "a") != _tree_bytes(tmp_path / "c")
    assert np.array_equal(np.asarray(photos.photo(3, 20, 10)), np.asarray(photos.photo(np.random.default_rng(3), 20, 10)))


def test_photo_modes_and_tiny_sizes():
    assert photos.photo(0, 1, 1).size == (1, 1)
    assert photos.photo(0, 8, 8, mode="L").mode == "L"
    cmyk = photos.photo(0, 8, 8, mode="CMYK")
    assert cmyk.mode == "CMYK"


def test_write_tree_wants_one_count():
    with pytest.raises(ValueError, match="exactly one"):
        photos.write_tree("unused", classes=2)
    with pytest.raises(ValueError, match="exactly one"):
        photos.write_tree("unused", classes=2, num_images=2, per_class=1)
