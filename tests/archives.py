"""The ImageNet downloads users start from, built small in their real formats from a folder tree
(``train/<wnid>/*.JPEG``, ``val/<wnid>/ILSVRC2012_val_NNNNNNNN.JPEG``), for `prepare`'s tests and
benchmark: the official archives (a tar of member tars, the flat val tar, the devkit tar.gz with a
``scipy.io.savemat`` meta.mat and the ground truth), Kaggle's folder, Hugging Face's tar.gz files
and parquet files. Member orders are shuffled, as nothing may depend on them."""
from __future__ import annotations

import csv
import io
import os
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np

META_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
               "num_train_images")
PARENTS = [("n00001740", "entity"), ("n01317541", "domestic animal, domesticated animal")]


def listing(tree: Path, split: str) -> list[tuple[str, Path]]:
    """(wnid, file) of every image of ``tree/split``, in sorted order."""
    return [(d.name, f) for d in sorted((tree / split).iterdir()) if d.is_dir() for f in sorted(d.iterdir())]


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o644
    tar.addfile(info, io.BytesIO(data))


def ids_of(classes: list[str]) -> dict[str, int]:
    """ILSVRC2012_IDs deliberately not in sorted-wnid order: the sorted order reversed, so that ID - 1
    or a sorted pairing gives wrong labels."""
    return {wnid: len(classes) - i for i, wnid in enumerate(sorted(classes))}


def meta_mat(classes: list[str], names: dict[str, str]) -> bytes:
    """meta.mat as the devkit's: an 8-field struct array ``synsets``, the leaf classes (IDs from
    :func:`ids_of`) and parent rows after them, as ``scipy.io.savemat`` writes it."""
    import scipy.io

    ids = ids_of(classes)
    rows = [(ids[w], w, names.get(w, w), f"gloss of {w}", 0, np.zeros(0), 0, 1300) for w in sorted(classes, key=ids.get)]
    rows += [(len(classes) + 1 + i, w, words, "a parent", 2, np.array([1, 2]), 3 + i, 0)
             for i, (w, words) in enumerate(PARENTS)]
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in META_FIELDS])
    for i, row in enumerate(rows):
        for name, value in zip(META_FIELDS, row):
            synsets[i, 0][name] = value
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def val_number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def official(tree: Path, dest: Path, names: dict[str, str], *, seed: int = 0) -> dict[str, Path]:
    """ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and ILSVRC2012_devkit_t12.tar.gz in ``dest``."""
    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    train = listing(tree, "train")
    classes = sorted({w for w, _ in train})
    paths = {"train": dest / "ILSVRC2012_img_train.tar", "val": dest / "ILSVRC2012_img_val.tar",
             "devkit": dest / "ILSVRC2012_devkit_t12.tar.gz"}
    with tarfile.open(paths["train"], "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in rng.sample(classes, len(classes)):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as tar:
                mine = [f for w, f in train if w == wnid]
                for f in rng.sample(mine, len(mine)):
                    add_bytes(tar, f.name, f.read_bytes())
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    val = listing(tree, "val")
    ids = ids_of(classes)
    truth = {val_number(f): ids[w] for w, f in val}
    with tarfile.open(paths["val"], "w", format=tarfile.GNU_FORMAT) as tar:
        for _, f in sorted(val, key=lambda wf: val_number(wf[1])):
            add_bytes(tar, f.name, f.read_bytes())
    with tarfile.open(paths["devkit"], "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat(classes, names))
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                  "".join(f"{truth[n]}\n" for n in sorted(truth)).encode())
    return paths


def kaggle(tree: Path, dest: Path, names: dict[str, str], *, seed: int = 0) -> Path:
    """Kaggle's imagenet-object-localization-challenge folder: train/<wnid>/, flat val/, an
    unordered LOC_val_solution.csv with several boxes a row, LOC_synset_mapping.txt."""
    rng = random.Random(seed)
    base = dest / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, f in listing(tree, "train"):
        (base / "train" / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, base / "train" / wnid / f.name)
    (base / "val").mkdir(parents=True)
    rows = []
    for wnid, f in listing(tree, "val"):
        shutil.copyfile(f, base / "val" / f.name)
        boxes = " ".join(f"{wnid} {10 + k} {12 + k} {30 + k} {40 + k}" for k in range(1 + len(rows) % 3))
        rows.append([f.stem, boxes + " "])
    rng.shuffle(rows)
    with open(dest / "LOC_val_solution.csv", "w", newline="") as out:
        csv.writer(out).writerows([["ImageId", "PredictionString"], *rows])
    classes = sorted({w for w, _ in listing(tree, "train")})
    (dest / "LOC_synset_mapping.txt").write_text("".join(f"{w} {names[w]}\n" for w in classes))
    return dest


def hf_name(wnid: str, f: Path) -> str:
    return f"{f.stem}_{wnid}{f.suffix}"


def hf_tars(tree: Path, dest: Path, *, seed: int = 0, train_parts: int = 2) -> list[Path]:
    """train_images_<k>.tar.gz (the train images dealt out over ``train_parts`` files) and
    val_images.tar.gz, each name with ``_<wnid>`` appended, as Hugging Face's imagenet-1k."""
    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    train = listing(tree, "train")
    rng.shuffle(train)
    paths = []
    for k in range(train_parts):
        paths.append(dest / f"train_images_{k}.tar.gz")
        with tarfile.open(paths[-1], "w:gz") as tar:
            for wnid, f in train[k::train_parts]:
                add_bytes(tar, hf_name(wnid, f), f.read_bytes())
    paths.append(dest / "val_images.tar.gz")
    with tarfile.open(paths[-1], "w:gz") as tar:
        for wnid, f in listing(tree, "val"):
            add_bytes(tar, hf_name(wnid, f), f.read_bytes())
    return paths


def parquet(tree: Path, dest: Path, *, seed: int = 0) -> list[Path]:
    """train-00000-of-00001.parquet and validation-00000-of-00001.parquet: ``image`` = {bytes, path}
    (train paths plain, val paths with ``_<wnid>``), ``label`` = the sorted-wnid index, row groups of 5."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    dest.mkdir(parents=True, exist_ok=True)
    classes = sorted({w for w, _ in listing(tree, "train")})
    paths = []
    for split, name in (("train", "train-00000-of-00001.parquet"), ("val", "validation-00000-of-00001.parquet")):
        rows = listing(tree, split)
        rng.shuffle(rows)
        image = pa.array([{"bytes": f.read_bytes(), "path": f.name if split == "train" else hf_name(w, f)}
                          for w, f in rows], type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": image, "label": pa.array([classes.index(w) for w, _ in rows], pa.int64())})
        paths.append(dest / name)
        pq.write_table(table, paths[-1], row_group_size=5)
    return paths


def truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)
    os.utime(path)
