"""The evaluation sets ``imagenet-trainer evaluate`` reads, each in its published layout, checked
when named (``--set NAME=PATH``) with an error that names the path and the layout expected:

* ``val``: ImageNet's val split, a tree ``PATH/<wnid>/*.JPEG`` (or a dataset root with ``val/``)
  or a pack (``PATH/manifest.json``, its val split);
* ``real``: ReaL's ``real.json`` (Beyer et al. 2020): one list of ImageNet-1k class indices per
  val image, in ``ILSVRC2012_val_%08d`` order; scored on the ``val`` images, matched by file name;
* ``v2``: ImageNet-V2 (any of its three variants): ``PATH/<class index 0..999>/*.jpeg``, the
  folder names read as numbers (a string sort puts ``10`` before ``2`` and mislabels them);
* ``sketch``, ``a``, ``r``: ``PATH/<wnid>/*`` (ImageNet-Sketch: 1,000 wnids; -A and -R: 200);
* ``c``: ImageNet-C, ``PATH/<corruption>/<severity 1-5>/<wnid>/*.JPEG`` (already 224x224).

A NAME is one of these kinds, or a kind and a suffix after a dash (``v2-threshold0.7``), so one
command can hold several variants. Labels are wnids; the ImageNet-1k class indices of ``v2`` and
``real`` name wnids through :func:`imagenet1k_wnids`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("val", "real", "v2", "sketch", "a", "r", "c")
WNID = re.compile(r"^n\d{8}$")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")
IMAGENET1K = 1000

_LAYOUTS = {
    "val": "PATH/<wnid>/*.JPEG (ImageNet's val tree sorted into class folders), a dataset root with val/, "
           "or a pack (PATH/manifest.json)",
    "real": "PATH = ReaL's real.json: a JSON list of lists of ImageNet-1k class indices, one list per val image",
    "v2": "PATH/<class index 0..999>/*.jpeg (ImageNet-V2)",
    "sketch": "PATH/<wnid>/*.JPEG (ImageNet-Sketch)",
    "a": "PATH/<wnid>/*.jpg (ImageNet-A)",
    "r": "PATH/<wnid>/*.jpg (ImageNet-R)",
    "c": "PATH/<corruption>/<severity 1-5>/<wnid>/*.JPEG (ImageNet-C)",
}


class EvalSetError(ValueError):
    """A set that cannot be read as its kind, or that the model cannot score: the message names it."""


@dataclass
class EvalSet:
    """One set named on the command line: its images (``source``), each image's label (a wnid) and,
    for ImageNet-C, each image's ``(corruption, severity)``. ``real`` holds ReaL's lists instead
    (its images are val's)."""

    name: str
    kind: str
    path: Path
    source: object = None  # data_pipelines.sources.Source (None for real)
    wnids: list[str] = field(default_factory=list, repr=False)  # per image
    classes: list[str] = field(default_factory=list)  # the set's wnids, sorted (A, R: the classes scored)
    groups: list[tuple[str, int]] = field(default_factory=list, repr=False)  # c: per image
    real: list[list[int]] = field(default_factory=list, repr=False)
    class_indices: list[int] = field(default_factory=list, repr=False)  # v2: per image, ImageNet-1k index

    def __len__(self) -> int:
        return 0 if self.source is None else len(self.source)

    def describe(self) -> str:
        return f"--set {self.name}={self.path}"


def parse_set(text: str) -> tuple[str, str, Path]:
    """``NAME=PATH`` -> (name, kind, path)."""
    name, sep, path = text.partition("=")
    name = name.strip()
    kind = name.split("-", 1)[0]
    if not sep or not path or kind not in KINDS:
        raise EvalSetError(f"--set {text!r}: expected NAME=PATH with NAME one of {', '.join(KINDS)} (or one with a "
                           f"-suffix, as v2-threshold0.7)")
    return name, kind, Path(path).expanduser()


def _is_image(name: str) -> bool:
    from data_pipelines.layout import IMAGE_EXTENSIONS

    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _subfolders(path: Path, kind: str, what: str) -> list[str]:
    if not path.is_dir():
        raise EvalSetError(f"{path} is not a folder: a {kind} set is {_LAYOUTS[kind]}")
    names = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not names:
        loose = any(_is_image(e.name) for e in os.scandir(path) if e.is_file())
        raise EvalSetError(f"{path} has no {what} folders{' (its images lie directly in it)' if loose else ''}: "
                           f"a {kind} set is {_LAYOUTS[kind]}")
    return names


def _images(folder: Path, kind: str) -> list[str]:
    files = sorted(e.path for e in os.scandir(folder) if e.is_file() and _is_image(e.name))
    if not files:
        raise EvalSetError(f"{folder} holds no images: a {kind} set is {_LAYOUTS[kind]}")
    return files


def _wnid_folders(path: Path, kind: str) -> list[str]:
    names = _subfolders(path, kind, "class")
    bad = [n for n in names if not WNID.match(n)]
    if bad:
        hint = ""
        if all(n.isdigit() for n in bad):
            hint = " (numbered folders are ImageNet-V2's layout: pass it as --set v2=PATH)"
        elif kind != "c" and all(WNID.match(s) for n in bad[:1] for s in _subfolders_quiet(path / n)):
            hint = f" (folders of wnid folders: is it ImageNet-C? pass it as --set c={path})"
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise EvalSetError(f"{path}: {len(bad)} folder(s) are not wnids (n########): {shown}{hint}; "
                           f"a {kind} set is {_LAYOUTS[kind]}")
    return names


def _subfolders_quiet(path: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_dir()] or ["-"]
    except OSError:
        return ["-"]


def _wnid_set(name: str, kind: str, path: Path) -> EvalSet:
    from data_pipelines.sources import FolderSource

    files, wnids = [], []
    classes = _wnid_folders(path, kind)
    for wnid in classes:
        found = _images(path / wnid, kind)
        files += found
        wnids += [wnid] * len(found)
    return EvalSet(name, kind, path, FolderSource(files, [0] * len(files)), wnids, classes)


def _val_set(name: str, path: Path) -> EvalSet:
    from data_pipelines import shards
    from data_pipelines.sources import FolderSource, PackSource

    if shards.is_sharded(path):
        try:
            split = shards.read_manifest(path).val
        except ValueError as err:
            raise EvalSetError(f"{path}: {err}") from None
        source = PackSource(split)
        wnids = [split.classes[source.label(i)] for i in range(len(source))]
        return EvalSet(name, "val", path, source, wnids, sorted(set(wnids)))
    if (path / "val").is_dir():
        path = path / "val"
    classes = _subfolders(path, "val", "class")
    files, wnids = [], []
    for wnid in classes:
        found = _images(path / wnid, "val")
        files += found
        wnids += [wnid] * len(found)
    return EvalSet(name, "val", path, FolderSource(files, [0] * len(files)), wnids, classes)


def _real_set(name: str, path: Path) -> EvalSet:
    if not path.is_file():
        raise EvalSetError(f"{path} is not a file: {_LAYOUTS['real']}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalSetError(f"{path} is not readable JSON ({err}): {_LAYOUTS['real']}") from None
    if not isinstance(data, list) or not all(isinstance(x, list) for x in data):
        raise EvalSetError(f"{path} is not a list of lists: {_LAYOUTS['real']}")
    for i, labels in enumerate(data):
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < IMAGENET1K for c in labels):
            raise EvalSetError(f"{path}: entry {i} (ILSVRC2012_val_{i + 1:08d}) is {labels}, not a list of "
                               f"ImageNet-1k class indices 0..999")
    return EvalSet(name, "real", path, real=data)


def _v2_set(name: str, path: Path) -> EvalSet:
    from data_pipelines.sources import FolderSource

    folders = _subfolders(path, "v2", "class-index")
    bad = [n for n in folders if not (n.isdigit() and int(n) < IMAGENET1K)]
    if bad:
        shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        hint = " (wnid folders: pass it as sketch, a or r)" if all(WNID.match(n) for n in bad) else ""
        raise EvalSetError(f"{path}: {len(bad)} folder(s) are not class indices 0..999: {shown}{hint}; "
                           f"a v2 set is {_LAYOUTS['v2']}")
    files, indices = [], []
    for folder in sorted(folders, key=int):  # numerically: "10" after "2"
        found = _images(path / folder, "v2")
        files += found
        indices += [int(folder)] * len(found)
    return EvalSet(name, "v2", path, FolderSource(files, [0] * len(files)), class_indices=indices)


def _c_set(name: str, path: Path) -> EvalSet:
    from data_pipelines.sources import FolderSource

    corruptions = _subfolders(path, "c", "corruption")
    wnid_like = [n for n in corruptions if WNID.match(n) or n.isdigit()]
    if wnid_like:
        raise EvalSetError(f"{path}/{wnid_like[0]} is a class or severity folder where a corruption's "
                           f"(gaussian_noise, ...) belongs: a c set is {_LAYOUTS['c']}")
    files, wnids, groups, classes = [], [], [], set()
    for corruption in corruptions:
        severities = _subfolders(path / corruption, "c", "severity")
        bad = [s for s in severities if s not in {"1", "2", "3", "4", "5"}]
        if bad:
            raise EvalSetError(f"{path / corruption}: folder(s) {', '.join(bad[:5])} are not severities 1-5: "
                               f"a c set is {_LAYOUTS['c']}")
        for severity in sorted(severities, key=int):
            folder = path / corruption / severity
            for wnid in _wnid_folders(folder, "c"):
                found = _images(folder / wnid, "c")
                files += found
                wnids += [wnid] * len(found)
                groups += [(corruption, int(severity))] * len(found)
                classes.add(wnid)
    return EvalSet(name, "c", path, FolderSource(files, [0] * len(files)), wnids, sorted(classes), groups)


def read_set(text: str) -> EvalSet:
    """The set ``--set NAME=PATH`` names, its layout checked (:class:`EvalSetError` otherwise)."""
    name, kind, path = parse_set(text)
    if not path.exists():
        raise EvalSetError(f"--set {name}={path}: {path} does not exist; a {kind} set is {_LAYOUTS[kind]}")
    if kind == "val":
        return _val_set(name, path)
    if kind == "real":
        return _real_set(name, path)
    if kind == "v2":
        return _v2_set(name, path)
    if kind == "c":
        return _c_set(name, path)
    return _wnid_set(name, kind, path)


def val_numbers(val: EvalSet) -> list[int | None]:
    """Each val image's number (``ILSVRC2012_val_00000001`` -> 1), None when its name has none."""
    out: list[int | None] = []
    for i in range(len(val)):
        m = VAL_NAME.search(val.source.key(i).rsplit("/", 1)[-1])
        out.append(int(m.group(1)) if m else None)
    return out


def imagenet1k_wnids(model_classes: list[str], val: EvalSet | None, needed_by: str) -> list[str]:
    """ImageNet-1k's wnids in class-index order (index i is the i-th wnid in sorted order), which
    ImageNet-V2's folders and ReaL's labels count in: the model's classes when they are 1,000 sorted
    wnids, else those of a ``val`` set with 1,000 class folders (a model with other outputs besides)."""
    if len(model_classes) == IMAGENET1K and model_classes == sorted(model_classes):
        return list(model_classes)
    if val is not None and len(val.classes) == IMAGENET1K and all(WNID.match(c) for c in val.classes):
        return sorted(val.classes)
    raise EvalSetError(
        f"{needed_by}: its labels are ImageNet-1k class indices (0..999, the 1,000 ImageNet-1k wnids in sorted "
        f"order), which name classes only for a model of exactly those 1,000 classes in sorted order, or "
        f"beside a --set val=PATH with all 1,000 class folders; this model has {len(model_classes)} classes"
        + ("" if len(model_classes) != IMAGENET1K else " not in sorted order")
    )


def check_wnids(evalset: EvalSet, model_classes: list[str]) -> None:
    """Refuses, by name, a set with wnids the model has no class for."""
    known = set(model_classes)
    missing = [w for w in (evalset.classes or sorted(set(evalset.wnids))) if w not in known]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise EvalSetError(f"{evalset.describe()}: the model has no class for {len(missing)} of the set's "
                           f"{len(set(evalset.wnids)) or len(evalset.classes)} wnids: {shown}; evaluate it only "
                           f"on sets whose classes it was trained on")
