"""Scanning an ImageNet-layout tree: class index order and clear errors."""
from __future__ import annotations

import pytest
from PIL import Image

from data_pipelines import photos
from data_pipelines.layout import DataLayoutError, scan_dataset
from data_pipelines.sample import make_sample_tree


def _jpeg(path):
    photos.write_jpeg(path, 0, 8, 8)  # a tiny photo: only the layout matters here


def test_class_index_is_sorted_wnid_order_like_imagefolder(tiny_root):
    from torchvision.datasets import ImageFolder

    train, val = scan_dataset(tiny_root)
    ref = ImageFolder(str(tiny_root / "train"))
    assert train.classes == ref.classes
    assert list(zip(train.files, train.labels)) == [(p, y) for p, y in ref.samples]
    assert val.classes == train.classes and len(val) == 4 * 5


def test_val_subset_of_classes_keeps_train_index(tmp_path):
    for wnid in ("n01", "n02", "n03"):
        _jpeg(tmp_path / "train" / wnid / "a.JPEG")
    _jpeg(tmp_path / "val" / "n03" / "b.JPEG")
    train, val = scan_dataset(tmp_path)
    assert val.labels == [2]


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda r: None, ["data.root", "does not exist"]),
        (lambda r: _jpeg(r / "val" / "n01" / "a.JPEG"), ["train", "sample-data"]),
        (lambda r: _jpeg(r / "train" / "n01" / "a.JPEG"), ["val"]),
        (lambda r: ((r / "train").mkdir(parents=True), (r / "val").mkdir()), ["no class folders"]),
        (lambda r: (_jpeg(r / "train" / "n01" / "a.JPEG"), (r / "train" / "n02").mkdir(),
                    _jpeg(r / "val" / "n01" / "b.JPEG")), ["n02", "holds no images"]),
        (lambda r: (_jpeg(r / "train" / "n01" / "a.JPEG"), _jpeg(r / "val" / "n09" / "b.JPEG")),
         ["n09", "absent from train"]),
    ],
    ids=["no-root", "no-train", "no-val", "no-classes", "empty-class", "val-class-not-in-train"],
)
def test_bad_trees_fail_with_a_message_naming_the_problem(tmp_path, build, words):
    root = tmp_path / "root"
    if build.__code__.co_consts != (None,):
        root.mkdir()
    build(root)
    with pytest.raises(DataLayoutError) as info:
        scan_dataset(root)
    for word in words:
        assert word in str(info.value)


def test_sample_tree_is_deterministic_and_imagenet_shaped(tmp_path):
    a = make_sample_tree(tmp_path / "a", num_classes=3, train_per_class=2, val_per_class=1, image_size=(32, 24))
    b = make_sample_tree(tmp_path / "b", num_classes=3, train_per_class=2, val_per_class=1, image_size=(32, 24))
    ta, va = scan_dataset(a)
    tb, _ = scan_dataset(b)
    assert len(ta) == 6 and len(va) == 3 and len(ta.classes) == 3
    for fa, fb in zip(ta.files, tb.files):
        assert open(fa, "rb").read() == open(fb, "rb").read()
    with Image.open(ta.files[0]) as img:
        assert img.format == "JPEG" and img.mode == "RGB"
