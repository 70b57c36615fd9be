"""The file-list cache returns what a fresh scan would, and notices when the tree changes."""
from __future__ import annotations

import os
import time

import pytest

from data_pipelines import filelist, layout

CLASSES = ["n001", "n002", "n003"]


def _age(root, seconds: float = 60.0) -> None:
    """Move the mtimes of every folder into the past, as on a tree that was not just written."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "imagenet"
    for split, per_class in (("train", 4), ("val", 2)):
        for c in CLASSES[: 3 if split == "train" else 2]:  # val holds a subset of the classes
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{c}_{i} with space.JPEG" if i == 1 else d / f"{c}_{i}.JPEG").write_bytes(b"x")
            (d / "notes.txt").write_text("not an image")
    _age(root)
    return root


def test_equals_scan_and_second_call_hits_the_cache(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    train = filelist.cached_split(root, "train", cache_dir=cache)
    assert train == layout.scan_split(root, "train")
    val = filelist.cached_split(root, "val", classes=train.classes, cache_dir=cache)
    assert val == layout.scan_split(root, "val", classes=train.classes)
    assert val.classes == CLASSES and set(val.labels) == {0, 1}

    files = sorted(cache.glob("*.txt"))
    assert len(files) == 2
    assert filelist.cache_path(root, "train", cache_dir=cache) in files
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # the cache is DALI's file_list format, relative to the split folder
    line = filelist.cache_path(root, "train", cache_dir=cache).read_text().splitlines()[1]
    assert line == "n001/n001_1 with space.JPEG 0"

    def no_scan(*_a, **_k):
        raise AssertionError("scanned although the cache is valid")

    monkeypatch.setattr(layout, "scan_split", no_scan)
    assert filelist.cached_split(root, "train", cache_dir=cache) == train
    assert filelist.cached_split(root, "val", classes=train.classes, cache_dir=cache) == val
    assert {f: f.stat().st_mtime_ns for f in sorted(cache.glob("*.txt"))} == stamps


def test_adding_a_file_invalidates_the_cache(root, tmp_path):
    cache = tmp_path / "cache"
    before = filelist.cached_split(root, "train", cache_dir=cache)
    old = filelist.cache_path(root, "train", cache_dir=cache)
    assert old.is_file()

    (root / "train" / "n002" / "n002_9.JPEG").write_bytes(b"x")
    after = filelist.cached_split(root, "train", cache_dir=cache)
    assert after == layout.scan_split(root, "train")
    assert len(after) == len(before) + 1 and str(root / "train" / "n002" / "n002_9.JPEG") in after.files

    # Just written, the tree is not cached yet (a change in the same timestamp tick could hide);
    # once it has aged, the new list replaces the old one.
    assert not filelist.cache_path(root, "train", cache_dir=cache).exists()
    _age(root)
    assert filelist.cached_split(root, "train", cache_dir=cache) == after
    assert filelist.cache_path(root, "train", cache_dir=cache).is_file()
    assert not old.exists() and len(list(cache.glob("*.txt"))) == 1


def test_removing_a_class_or_renaming_a_file_invalidates_the_cache(root, tmp_path):
    cache = tmp_path / "cache"
    filelist.cached_split(root, "train", cache_dir=cache)
    os.rename(root / "train" / "n003" / "n003_0.JPEG", root / "train" / "n003" / "n003_7.JPEG")
    assert filelist.cached_split(root, "train", cache_dir=cache) == layout.scan_split(root, "train")
    for f in (root / "train" / "n003").iterdir():
        f.unlink()
    (root / "train" / "n003").rmdir()
    now = filelist.cached_split(root, "train", cache_dir=cache)
    assert now == layout.scan_split(root, "train") and now.classes == CLASSES[:2]


def test_a_damaged_cache_is_rebuilt(root, tmp_path):
    cache = tmp_path / "cache"
    good = filelist.cached_split(root, "train", cache_dir=cache)
    path = filelist.cache_path(root, "train", cache_dir=cache)
    path.write_text("n001/n001_0.JPEG 0\nn001/n0")  # cut off mid-write
    with pytest.warns(UserWarning, match="damaged"):
        assert filelist.cached_split(root, "train", cache_dir=cache) == good


def test_layout_errors_are_the_same_as_a_scan(tmp_path):
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(layout.DataLayoutError, match="holds no images"):
        filelist.cached_split(tmp_path, "train", cache_dir=tmp_path / "cache")
    with pytest.raises(layout.DataLayoutError, match="missing"):
        filelist.cached_split(tmp_path, "val", cache_dir=tmp_path / "cache")


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert filelist.default_cache_dir() == tmp_path / "imagenet-trainer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert filelist.default_cache_dir() == tmp_path / ".cache" / "imagenet-trainer"
