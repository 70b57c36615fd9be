"""Scanning and validating an ImageNet-layout tree.

    ROOT/train/<wnid>/*.JPEG
    ROOT/val/<wnid>/*.JPEG

The class index is the position of the wnid in the sorted list of train folders, the same order
as torchvision's ``ImageFolder`` (``find_classes``), so that weights trained here interoperate with
torchvision code; image files are those with torchvision's ``IMG_EXTENSIONS``. Where it differs
from ``ImageFolder``, on purpose: hidden folders and files (names starting with ".", such as
``.ipynb_checkpoints``) are skipped, where ``ImageFolder`` would make a hidden folder a class and
shift every index after it; and only the files directly in a class folder are images, where
``ImageFolder`` also walks its subfolders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# torchvision's IMG_EXTENSIONS (lower-cased; ImageNet uses ".JPEG"); Pillow and DALI decode them all.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataLayoutError(ValueError):
    """The tree does not have the ImageNet layout; the message says what to fix."""


# Class names (optional) beside train/ and val/: one line a class, "WNID WORDS", the format of
# Caffe's synset_words.txt and Kaggle's LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca").
NAMES_FILE = "synset_words.txt"


def parse_names(text: str, source: str) -> dict[str, str]:
    """wnid -> words of a synset_words.txt-style ``text`` (read from ``source``, named in errors)."""
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not words.strip():
            raise DataLayoutError(f"{source}:{number}: expected 'WNID WORDS' (e.g. 'n01440764 tench, Tinca tinca'), "
                                  f"found {line.strip()!r}")
        if wnid in names:
            raise DataLayoutError(f"{source}:{number}: {wnid} is named twice")
        names[wnid] = words.strip()
    return names


def read_names(root: str | os.PathLike, classes: list[str]) -> list[str] | None:
    """The words of each class of ``classes`` from ``root/synset_words.txt`` ("" for a class it does
    not name), or None without that file. Names are for people: wnids stay the identifiers
    (ImageNet has two classes named "crane")."""
    path = Path(root) / NAMES_FILE
    if not path.is_file():
        return None
    names = parse_names(path.read_text(encoding="utf-8"), str(path))
    return [names.get(c, "") for c in classes]


def short_name(words: str) -> str:
    """The first of a class's comma-separated names: "tench" of "tench, Tinca tinca"."""
    return words.split(",")[0].strip()


@dataclass(frozen=True)
class Split:
    """One split of the tree: every image file and its class index."""

    root: Path
    classes: list[str]
    files: list[str] = field(repr=False)
    labels: list[int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.files)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names under ``split_dir`` (hidden folders skipped)."""
    if not split_dir.is_dir():
        raise DataLayoutError(
            f"{split_dir} is missing: an ImageNet-layout root needs train/<class>/*.JPEG and "
            f"val/<class>/*.JPEG (make a small one with `imagenet-trainer sample-data DIR`)"
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataLayoutError(f"{split_dir} has no class folders: expected {split_dir}/<class>/*.JPEG")
    return classes


def scan_split(root: str | os.PathLike, split: str, classes: list[str] | None = None) -> Split:
    """List every image of ``root/split``.

    ``classes`` fixes the class index (the train classes, when scanning val); a folder of
    ``split`` that is not among them is an error, a class of ``classes`` missing from val is not
    (a val subset is legitimate).
    """
    split_dir = Path(root) / split
    found = list_classes(split_dir)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise DataLayoutError(
                f"{split_dir} has {len(unknown)} class folder(s) absent from train/: {shown}; "
                f"every val class needs a train folder of the same name"
            )
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for wnid in found:
        class_dir = split_dir / wnid
        names = sorted(e.name for e in os.scandir(class_dir) if e.is_file() and _is_image(e.name))
        if not names:
            raise DataLayoutError(
                f"{class_dir} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)}); "
                f"remove the folder or add its images"
            )
        files.extend(str(class_dir / n) for n in names)
        labels.extend([index[wnid]] * len(names))
    return Split(root=split_dir, classes=list(classes), files=files, labels=labels)


def scan_dataset(root: str | os.PathLike) -> tuple[Split, Split]:
    """Scan ``root/train`` and ``root/val``; val is indexed by the train classes."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"data.root={root} does not exist or is not a folder")
    train = scan_split(root, "train")
    val = scan_split(root, "val", classes=train.classes)
    return train, val
