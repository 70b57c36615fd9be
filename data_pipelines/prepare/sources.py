"""What `imagenet-trainer prepare` reads: each source recognised from what it holds (:func:`classify`)
and read into :class:`~.common.Entry` lists, one per image of the equivalent folder tree, saying where
its bytes lie (:func:`gather`).

Kinds: the official ILSVRC-2012 archives, read in place (:mod:`.official`); Kaggle's folder, a
folder tree, a names file (:mod:`.folders`); Hugging Face's tar.gz and parquet files, spooled
(:mod:`.huggingface`).
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from .common import VAL_NAME, ArgumentError, Gathered, SourceError
from .folders import KAGGLE_BASE, read_kaggle, read_names_file, read_tree
from .huggingface import read_hf_tar, read_parquet
from .official import label_official_val, read_devkit, read_train_tar, read_val_tar


def classify(path: Path) -> str:
    """The kind of the source ``path``: tree, kaggle, train_tar, val_tar, devkit, hf_tar, parquet,
    names; an :class:`ArgumentError` when it is none of them."""
    if path.is_dir():
        if (path / KAGGLE_BASE / "train").is_dir():
            return "kaggle"
        if (path / "train").is_dir() and (path / "val").is_dir():
            return "tree"
        raise ArgumentError(f"{path} is a folder but neither a folder tree (train/<wnid>/, val/<wnid>/) nor Kaggle's "
                            f"download (ILSVRC/Data/CLS-LOC/train/): give one of them, or the archives")
    if not path.is_file():
        raise ArgumentError(f"{path} does not exist")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "names"
    try:
        if name.endswith((".tar.gz", ".tgz", ".gz")):
            with tarfile.open(path, "r|gz") as tar:
                first = [m.name for _, m in zip(range(8), tar)]
            return "devkit" if any(n.endswith("data/meta.mat") for n in first) else "hf_tar"
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ArgumentError(f"{path} is not a readable tar archive ({err}): give the ILSVRC-2012 archives, Hugging "
                            f"Face's .tar.gz or .parquet files, Kaggle's folder or a folder tree") from err
    if first is None:
        raise SourceError(f"{path} is an empty tar archive")
    if first.name.endswith(".tar"):
        return "train_tar"
    if VAL_NAME.match(Path(first.name).name):
        return "val_tar"
    what = "val" if "val" in name else "train" if "train" in name else None
    if what == "train":
        raise SourceError(f"{path}: a train archive holds member tars (nXXXXXXXX.tar), but its first member is "
                          f"{first.name!r}: is this ILSVRC2012_img_train.tar?")
    if what == "val":
        raise SourceError(f"{path}: a val archive holds ILSVRC2012_val_NNNNNNNN.JPEG files, but its first member is "
                          f"{first.name!r} (a train name?): is this ILSVRC2012_img_val.tar?")
    raise ArgumentError(f"{path}: a tar whose first member is {first.name!r} is neither the ILSVRC-2012 train "
                        f"archive (member tars) nor the val archive (ILSVRC2012_val_NNNNNNNN.JPEG)")


# -- all of them ----------------------------------------------------------------------------------
def gather(kinds: list[tuple[str, Path]], spool_dir: Path) -> Gathered:
    """Read every source, given with its kind (:func:`kinds_of`); the devkit and names first, as other
    sources' labels need them."""
    order = ["devkit", "names", "tree", "kaggle", "train_tar", "val_tar", "hf_tar", "parquet"]
    kinds.sort(key=lambda kp: order.index(kp[0]))
    into = Gathered()
    for kind, path in kinds:
        if kind == "devkit":
            if into.devkit is not None:
                raise ArgumentError(f"two devkits given: {into.devkit.path} and {path}")
            into.devkit = read_devkit(path)
            into.names.update(into.devkit.names)
        elif kind == "names":
            read_names_file(path, into)
        elif kind == "tree":
            read_tree(path, into)
        elif kind == "kaggle":
            read_kaggle(path, into)
        elif kind == "train_tar":
            read_train_tar(path, into)
        elif kind == "val_tar":
            read_val_tar(path, into)
        elif kind == "hf_tar":
            read_hf_tar(path, into, spool_dir)
        elif kind == "parquet":
            wnids = sorted(into.devkit.wnid_of_id.values()) if into.devkit else sorted(into.names) or None
            read_parquet(path, into, spool_dir, wnids)
    label_official_val(into)
    return into


def kinds_of(paths: list[Path]) -> list[tuple[str, Path]]:
    """Each source with its kind (:func:`classify`)."""
    return [(classify(p), p) for p in paths]


