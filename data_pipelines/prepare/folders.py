"""Sources that are folders or plain files: a folder tree ``train/<wnid>/``, ``val/<wnid>/`` (what
``pack`` reads), Kaggle's download (``ILSVRC/Data/CLS-LOC``, ``LOC_val_solution.csv``,
``LOC_synset_mapping.txt``) and a synset_words.txt-style names file."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from .. import layout
from .common import WNID, ArgumentError, Entry, Gathered, SourceError, file_entry, image_name

KAGGLE_BASE = Path("ILSVRC", "Data", "CLS-LOC")


def read_tree(path: Path, into: Gathered) -> None:
    """A folder tree, listed as ``pack`` lists it; its synset_words.txt's names."""
    train, val = layout.scan_dataset(path)
    for split, entries in ((train, into.train), (val, into.val)):
        entries.extend(file_entry(train.classes[label], f) for f, label in zip(split.files, split.labels))
    names_file = path / layout.NAMES_FILE
    if names_file.is_file():
        into.names.update(layout.parse_names(names_file.read_text(encoding="utf-8"), str(names_file)))


def read_kaggle(path: Path, into: Gathered) -> None:
    """Kaggle's download: train/<wnid>/ as a tree, val/ flat labelled by LOC_val_solution.csv."""
    base = path / KAGGLE_BASE
    train = layout.scan_split(base, "train")
    into.train.extend(file_entry(train.classes[label], f) for f, label in zip(train.files, train.labels))
    solution = path / "LOC_val_solution.csv"
    if not solution.is_file():
        raise ArgumentError(f"{path} has no LOC_val_solution.csv (the val labels): give the whole Kaggle download")
    wnid_of: dict[str, tuple[str, int]] = {}
    with open(solution, newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if number == 1 and row[:1] == ["ImageId"]:
                continue
            words = row[1].split() if len(row) == 2 else []
            if not words or not WNID.match(words[0]):
                raise SourceError(f"{solution}:{number}: expected 'ImageId,nXXXXXXXX x0 y0 x1 y1 ...', found {row!r}")
            if row[0] in wnid_of:
                raise SourceError(f"{solution}:{number}: {row[0]} is labelled twice (line {wnid_of[row[0]][1]} too)")
            wnid_of[row[0]] = (words[0], number)
    val_dir = base / "val"
    files = sorted(e.name for e in os.scandir(val_dir) if e.is_file() and image_name(e.name)) if val_dir.is_dir() else []
    if not files:
        raise ArgumentError(f"{val_dir} holds no images: give the whole Kaggle download")
    stems = set()
    for name in files:
        stem = Path(name).stem
        stems.add(stem)
        if stem not in wnid_of:
            raise SourceError(f"{val_dir / name} has no row in {solution}: the CSV does not cover every val image")
        entry = file_entry(wnid_of[stem][0], str(val_dir / name))
        into.val.append(Entry(entry.wnid, entry.filename, entry.path, None, entry.size, entry.mtime_ns,
                              f"{entry.where} ({solution.name} line {wnid_of[stem][1]}: {entry.wnid})"))
    extra = sorted((n, image) for image, (_, n) in wnid_of.items() if image not in stems)
    if extra:
        raise SourceError(f"{solution}:{extra[0][0]}: {extra[0][1]} has no image in {val_dir} ({len(extra)} such rows)")
    mapping = path / "LOC_synset_mapping.txt"
    if mapping.is_file():
        into.names.update(layout.parse_names(mapping.read_text(encoding="utf-8"), str(mapping)))


def read_names_file(path: Path, into: Gathered) -> None:
    into.names.update(layout.parse_names(path.read_text(encoding="utf-8"), str(path)))
    into.names_files.append(str(path))
