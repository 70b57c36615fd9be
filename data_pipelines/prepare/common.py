"""What every source of `imagenet-trainer prepare` is read into: :class:`Entry` (one image of the
equivalent folder tree, and where its bytes lie), :class:`Gathered` (everything the sources gave),
the two kinds of error, and the names ImageNet's downloads give their files."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from .. import layout
from ..pack import PackError

VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})(\.[A-Za-z]+)$")
WNID = re.compile(r"^n\d{8}$")
HF_NAME = re.compile(r"^(?P<stem>.+)_(?P<wnid>n\d{8})(?P<ext>\.[A-Za-z]+)$")  # n01440764_10026_n01440764.JPEG


class ArgumentError(PackError):
    """The sources given cannot make a dataset (missing, unknown, incomplete): exit 2."""


class SourceError(PackError):
    """A source is not what it claims or contradicts another (truncated, mislabelled): exit 1."""


@dataclass(frozen=True)
class Entry:
    """One image: ``<split>/<wnid>/<filename>`` of the equivalent tree, whose bytes are ``size``
    bytes at ``offset`` of ``path`` (``offset`` None: the whole file ``path``)."""

    wnid: str
    filename: str
    path: str
    offset: int | None
    size: int
    mtime_ns: int
    where: str  # the file, or archive:member, for messages and the manifest's "skipped"


@dataclass
class Devkit:
    path: str
    wnid_of_id: dict[int, str]  # ILSVRC2012_ID -> WNID of the 1,000 leaf classes
    names: dict[str, str]
    ground_truth: list[str]  # the file's lines
    truth_path: str


@dataclass
class Gathered:
    """Everything the sources gave, before labels are resolved."""

    train: list[Entry] = field(default_factory=list)
    val: list[Entry] = field(default_factory=list)
    val_numbered: list[tuple[int, Entry]] = field(default_factory=list)  # the official val tar: wnid still ""
    val_tars: list[str] = field(default_factory=list)
    devkit: Devkit | None = None
    names: dict[str, str] = field(default_factory=dict)
    names_files: list[str] = field(default_factory=list)


def image_name(name: str) -> bool:
    """Whether a file of this name is an image (as :mod:`layout` lists them)."""
    return name.lower().endswith(layout.IMAGE_EXTENSIONS) and not name.startswith(".")


def file_entry(wnid: str, path: str) -> Entry:
    """A whole image file of ``wnid``."""
    st = os.stat(path)
    path = os.path.abspath(path)
    return Entry(wnid, os.path.basename(path), path, None, st.st_size, st.st_mtime_ns, path)
