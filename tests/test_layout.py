"""Scanning an ImageNet-layout tree: class index order and clear errors."""
from __future__ import annotations

import pytest
from PIL import Image

from data_pipelines.layout import DataLayoutError, scan_dataset
from data_pipelines.sample import make_sample_tree
from tests import photos


def _jpeg(path):
    photos.write_jpeg(path, 0, 8, 8)  # a tiny photo: only the layout matters here


def test_class_index_is_sorted_wnid_order_like_imagefolder(tiny_root):
    from torchvision.datasets import ImageFolder

    train, val = scan_dataset(tiny_root)
    ref = ImageFolder(str(tiny_root / "train"))
    assert train.classes == ref.classes
    assert list(zip(train.files, train.labels)) == [(p, y) for p, y in ref.samples]
    assert val.classes == train.classes and len(val) == 4 * 5


def test_image_files_are_imagefolders_and_only_hidden_entries_differ(tmp_path):
    """torchvision's extensions (a .tif and a .ppm are images, a .txt is not); hidden folders and
    files are skipped, the one documented difference from ImageFolder (layout.py)."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from data_pipelines.layout import IMAGE_EXTENSIONS

    assert sorted(IMAGE_EXTENSIONS) == sorted(IMG_EXTENSIONS)
    for wnid, name in (("n01", "a.JPEG"), ("n01", "b.tif"), ("n02", "c.ppm"), ("n02", "d.webp")):
        (tmp_path / "train" / wnid).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / wnid / name, format="JPEG" if name.endswith("JPEG") else None)
    (tmp_path / "train" / "n02" / "notes.txt").write_text("not an image")
    _jpeg(tmp_path / "val" / "n01" / "e.JPEG")
    train, _ = scan_dataset(tmp_path)
    ref = ImageFolder(str(tmp_path / "train"))
    assert train.classes == ref.classes and list(zip(train.files, train.labels)) == ref.samples
    _jpeg(tmp_path / "train" / ".ipynb_checkpoints" / "x.JPEG")  # ImageFolder: a class, shifting the rest
    assert scan_dataset(tmp_path)[0].classes == ["n01", "n02"]
    assert ImageFolder(str(tmp_path / "train")).classes == [".ipynb_checkpoints", "n01", "n02"]


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
