"""Hugging Face's ``imagenet-1k``: ``train_images_*.tar.gz`` / ``val_images.tar.gz`` (``_<wnid>``
appended to each name) and the parquet files (``image`` = {bytes, path}, ``label`` = the sorted-wnid
index). Neither can be read at an offset, so each is copied once, in order, into a spool file under
``OUT/.pack/spool/`` (the images' bytes only: about the size of the pack on disk, until the output is
complete), which is then read in place; a resumed run reuses a complete spool of an unchanged source."""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from pathlib import Path

from ..files import fsync_dir, write_atomic
from .common import HF_NAME, VAL_NAME, ArgumentError, Entry, Gathered, SourceError, image_name


class _Spool:
    """The images of one source, copied in order into ``OUT/.pack/spool/<name>.bin``; the list of
    them, with the source's size and mtime, in ``<name>.json`` once complete (reused when the
    source is unchanged)."""

    def __init__(self, folder: Path, source: Path) -> None:
        st = source.stat()
        self.source = source
        self.stamp = [str(source.resolve()), st.st_size, st.st_mtime_ns]
        # The path's hash in the name: two sources of one name (two folders' val_images.tar.gz) stay apart.
        name = f"{source.name}.{hashlib.sha256(self.stamp[0].encode()).hexdigest()[:12]}"
        self.bin, self.index = folder / (name + ".bin"), folder / (name + ".json")
        self.rows: list[list] = []

    def load(self) -> list[list] | None:
        try:
            data = json.loads(self.index.read_text())
            if data["source"] == self.stamp and self.bin.stat().st_size == data["bytes"]:
                return data["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def __enter__(self):
        self.bin.parent.mkdir(parents=True, exist_ok=True)
        self.index.unlink(missing_ok=True)
        self.file = open(self.bin, "wb")
        self.pos = 0
        return self

    def add(self, split: str, wnid: str, filename: str, data: bytes, where: str) -> None:
        self.file.write(data)
        self.rows.append([split, wnid, filename, self.pos, len(data), where])
        self.pos += len(data)

    def __exit__(self, kind, *rest) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if kind is None:
            write_atomic(self.index, json.dumps({"source": self.stamp, "bytes": self.pos, "rows": self.rows}))
            fsync_dir(self.index.parent)


def _add_spooled(spool: _Spool, rows: list[list], into: Gathered) -> None:
    mtime = spool.bin.stat().st_mtime_ns
    for split, wnid, filename, offset, size, where in rows:
        (into.train if split == "train" else into.val).append(
            Entry(wnid, filename, str(spool.bin.resolve()), offset, size, mtime, where))


def read_hf_tar(path: Path, into: Gathered, spool_dir: Path) -> None:
    """Hugging Face's train_images_*.tar.gz / val_images.tar.gz: one pass, spooled."""
    spool = _Spool(spool_dir, path)
    rows = spool.load()
    if rows is None:
        kind, member = None, None
        try:
            with spool, tarfile.open(path, "r|gz") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = Path(member.name).name
                    match = HF_NAME.match(name)
                    if not match or not image_name(name):
                        raise SourceError(f"{path}: member {member.name!r} is not <name>_<wnid>.JPEG (Hugging Face's "
                                          f"imagenet-1k names)")
                    split = "val" if VAL_NAME.match(match["stem"] + match["ext"]) else "train"
                    kind = kind or split
                    if split != kind:
                        raise SourceError(f"{path}: member {member.name!r} is a {split} image in a {kind} archive")
                    spool.add(split, match["wnid"], match["stem"] + match["ext"], tar.extractfile(member).read(),
                              f"{path}:{member.name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            after = f"in or after member {member.name}" if member is not None else "at its start"
            raise SourceError(f"{path}: unreadable {after} ({err}): the archive is truncated or damaged; "
                              f"download it again") from err
        rows = spool.rows
    _add_spooled(spool, rows, into)


def parquet_split(path: Path) -> str:
    name = path.name.lower()
    if name.startswith("train"):
        return "train"
    if name.startswith(("validation", "val")):
        return "val"
    if name.startswith("test"):
        raise ArgumentError(f"{path}: the test split has no labels; give the train and validation parquet files")
    raise ArgumentError(f"{path}: cannot tell its split from the name: Hugging Face's files are "
                        f"train-NNNNN-of-NNNNN.parquet and validation-NNNNN-of-NNNNN.parquet")


def read_parquet(path: Path, into: Gathered, spool_dir: Path, wnids: list[str] | None) -> None:
    """Hugging Face's parquet files (``image`` = {bytes, path}, ``label`` = the sorted-wnid index),
    read by row group and spooled; ``wnids``: the sorted wnids the labels index."""
    split = parquet_split(path)
    if wnids is None:
        raise ArgumentError(f"{path}: its labels are indices into the sorted wnids, which the parquet files do not "
                            f"hold: pass also the devkit (ILSVRC2012_devkit_t12.tar.gz) or a LOC_synset_mapping.txt / "
                            f"synset_words.txt listing the 1,000 classes")
    import pyarrow.parquet as pq

    spool = _Spool(spool_dir, path)
    rows = spool.load()
    if rows is None:
        try:
            with spool:
                pf = pq.ParquetFile(path)
                row = 0
                for group in range(pf.num_row_groups):
                    table = pf.read_row_group(group, columns=["image", "label"])
                    images = table.column("image").combine_chunks()
                    for data, name, label in zip(images.field("bytes").to_pylist(), images.field("path").to_pylist(),
                                                 table.column("label").to_pylist()):
                        where = f"{path}: row {row}"
                        if label is None or not 0 <= label < len(wnids):
                            raise SourceError(f"{where} has label {label}, not an index of the {len(wnids)} classes")
                        if not data or not name:
                            raise SourceError(f"{where} has no image bytes or no path")
                        wnid, base = wnids[label], Path(name).name
                        match = HF_NAME.match(base)
                        if match and match["wnid"] == wnid:  # HF's appended _<wnid>, as in its tars
                            base = match["stem"] + match["ext"]
                        spool.add(split, wnid, base, data, f"{where} ({name})")
                        row += 1
        except (OSError, KeyError) as err:
            raise SourceError(f"{path}: unreadable parquet ({err}): expected Hugging Face's imagenet-1k columns "
                              f"image={{bytes, path}} and label") from err
        rows = spool.rows
    _add_spooled(spool, rows, into)


