"""Frozen features of image sets: the ``imagenet-trainer features`` verb.

Each image's pooled features (the input of the classifier ``fc``: global average pooling of the
last stage, 512 values for ResNet-18/34, 2,048 for ResNet-50) under the model's own validation
preprocessing, written in DINO's dump layout (``eval_knn.py --dump_features``), which
``imagenet-trainer knn`` and DINO's ``--load_features`` read:

    DIR/trainfeat.pth    float32 [N_train, D]   one row per image of --set train
    DIR/trainlabels.pth  int64 [N_train]        its class index
    DIR/testfeat.pth     float32 [N_val, D]     --set val (DINO calls it "test")
    DIR/testlabels.pth   int64 [N_val]
    DIR/trainfiles.txt, DIR/testfiles.txt       row i's image, relative to the set's folder
    DIR/features.json    the model, the classes the labels index, each set's folder and count

A set is one split folder with a folder per class (``/data/imagenet/train``, whose subfolders are
wnids), or a dataset root holding the set's split (``--set train=/data/imagenet`` reads its
``train/``, ``--set val=/data/imagenet`` its ``val/``); rows follow torchvision ``ImageFolder``'s
order (class folders sorted, then file names).
Labels go through wnids: by default a class folder must be one of the model's classes and its label
is the model's index of it; ``--classes folders`` indexes the training set's sorted folders
instead (another dataset than the model's, e.g. for a kNN on Flowers-102).

The features are the raw pooled values (``knn`` normalises them); ``--l2-normalize`` writes them
normalised, as DINO's script dumps them: its ``--load_features`` uses them as they are.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

INFO_FILE = "features.json"
# --set NAME -> DINO's file names (its "test" is the val set)
OUTPUTS = {"train": ("trainfeat.pth", "trainlabels.pth", "trainfiles.txt"),
           "val": ("testfeat.pth", "testlabels.pth", "testfiles.txt")}
CLASS_SOURCES = ("model", "folders")
ORDER = ("torchvision ImageFolder's: class folders sorted by name, then the files of each sorted by name; "
         "row i of {features} is line i of {files}")
_SHOWN = 5  # names listed in an error, the rest counted


class FeaturesError(ValueError):
    """A bad --set, layout or class: the message says what to do (exit code 2)."""


@dataclass(frozen=True)
class ImageSet:
    """One --set: its image files in row order, and each file's class folder name."""

    name: str
    path: Path
    files: list[str]
    folders: list[str]  # per file: its class folder (a wnid)


def parse_sets(values: list[str]) -> dict[str, Path]:
    """``["train=PATH", "val=PATH"]`` -> {name: path}, train first; a FeaturesError for anything else."""
    sets: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise FeaturesError(f"--set {value!r}: expected NAME=PATH, e.g. --set train=/data/imagenet/train")
        if name not in OUTPUTS:
            raise FeaturesError(f"--set {name}=...: the sets are {' and '.join(OUTPUTS)} "
                                f"(DINO's train and test features)")
        if name in sets:
            raise FeaturesError(f"--set {name} is given twice")
        sets[name] = Path(path)
    if not sets:
        raise FeaturesError("no --set given: pass --set train=ROOT/train --set val=ROOT/val")
    return {n: sets[n] for n in OUTPUTS if n in sets}


def scan_set(name: str, path: Path) -> ImageSet:
    """The images of ``path/<class>/*``, or of ``path/<name>/<class>/*`` when ``path`` is a dataset
    root (data_pipelines.layout's rules: hidden entries skipped, only the files directly in a class
    folder); a FeaturesError names what is wrong."""
    import os

    from data_pipelines.layout import IMAGE_EXTENSIONS, DataLayoutError, scan_split

    path = Path(os.path.abspath(path))  # "." has no parent and name to scan by
    if not path.is_dir():
        raise FeaturesError(f"--set {name}={path}: no such folder")
    # A dataset root (ROOT/train/<wnid>/, ROOT/val/<wnid>/): the set's own split of it.
    inner = [s for s in OUTPUTS if (path / s).is_dir()
             and not any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(path / s))]
    if name in inner:
        path = path / name
    elif inner:
        raise FeaturesError(f"--set {name}={path} looks like a dataset root (it holds {'/, '.join(inner)}/) without "
                            f"{name}/: give the split folder whose subfolders are classes, or a root with {name}/")
    try:
        split = scan_split(path.parent, path.name)
    except DataLayoutError as err:
        raise FeaturesError(f"--set {name}={path}: {err}") from None
    return ImageSet(name, path, split.files, [split.classes[i] for i in split.labels])


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def class_index(sets: dict[str, ImageSet], model_classes: list[str], source: str) -> list[str]:
    """The classes the labels index: the model's (every folder must be one of them), or with
    ``source="folders"`` the training set's sorted folders (val's when there is no training set)."""
    if source == "model":
        known = set(model_classes)
        for image_set in sets.values():
            unknown = sorted(set(image_set.folders) - known)
            if unknown:
                raise FeaturesError(
                    f"--set {image_set.name}={image_set.path}: {len(unknown)} class folder(s) are not classes of the "
                    f"model ({_listed(unknown)}); labels go through the model's wnids. For another dataset's classes "
                    f"pass --classes folders")
        return list(model_classes)
    if source != "folders":
        raise FeaturesError(f"--classes {source}: expected one of {', '.join(CLASS_SOURCES)}")
    base = sets.get("train") or next(iter(sets.values()))
    classes = sorted(set(base.folders))
    for image_set in sets.values():
        unknown = sorted(set(image_set.folders) - set(classes))
        if unknown:
            raise FeaturesError(f"--set {image_set.name}={image_set.path} has {len(unknown)} class folder(s) the "
                                f"train set lacks ({_listed(unknown)}): its labels would index no training class")
    return classes


def extract(pretrained, image_set: ImageSet, classes: list[str], *, batch_size: int, backend: str,
            workers: int):
    """(features [N, D] float32, labels [N] int64) of ``image_set``: the input of ``fc``, by
    ``inference.forward_images``, which every rank of a multi-process launch returns whole."""
    import torch

    from trainer.artifacts.inference import forward_images

    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[f] for f in image_set.folders], dtype=torch.int64)
    features = forward_images(pretrained, image_set.files, output="features", batch_size=batch_size,
                              backend=backend, workers=workers)
    return features.to(torch.float32).contiguous(), labels


def write_dump(out: Path, name: str, image_set: ImageSet, features, labels) -> None:
    """The set's three files in ``out``, each written whole or not at all."""
    import torch

    from data_pipelines.files import atomic_path, write_atomic

    feat_name, label_name, files_name = OUTPUTS[name]
    with atomic_path(out / feat_name) as tmp:
        torch.save(features, tmp)
    with atomic_path(out / label_name) as tmp:
        torch.save(labels, tmp)
    rel = [str(Path(f).relative_to(image_set.path)) for f in image_set.files]
    write_atomic(out / files_name, "".join(r + "\n" for r in rel))


def describe(model: str, pretrained, sets: dict[str, ImageSet], classes: list[str], source: str, dim: int,
             normalized: bool) -> dict:
    """features.json: what made the features and what their rows and labels mean."""
    from trainer.artifacts.inference import preprocessing

    meta = pretrained.meta
    return {
        "model": str(model),
        "arch": meta.get("arch"),
        "format": meta.get("format"),
        "weights": meta.get("weights"),
        "source": meta.get("source"),
        "preprocessing": preprocessing(pretrained),
        "features": "the input of fc: global average pooling of the last stage",
        "dim": dim,
        "l2_normalized": normalized,
        "labels": ("the model's class index (its wnids)" if source == "model"
                   else "the index of the train set's sorted class folders"),
        "classes": classes,
        "sets": {
            name: {"path": str(s.path), "images": len(s.files), "features": OUTPUTS[name][0],
                   "labels": OUTPUTS[name][1], "files": OUTPUTS[name][2],
                   "order": ORDER.format(features=OUTPUTS[name][0], files=OUTPUTS[name][2])}
            for name, s in sets.items()
        },
    }


def merge_info(path: Path, info: dict) -> dict:
    """``info`` with the other set of an earlier run into the same folder kept (train and val
    written by two runs) when that run had the same model, classes and normalisation; else its
    entries are dropped, and ``knn`` refuses the stale files."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return info
    same = ("model", "weights", "classes", "dim", "l2_normalized", "preprocessing")
    if isinstance(old, dict) and all(old.get(k) == info[k] for k in same):
        return {**info, "sets": {**(old.get("sets") or {}), **info["sets"]}}
    return info


EPILOG = """\
A set is a split folder with a folder per class (wnids), --set train=/data/imagenet/train, or a
dataset root holding the split (--set train=/data/imagenet reads its train/). The files, in DINO's
dump layout (eval_knn.py --dump_features):
  trainfeat.pth [N, D] float32, trainlabels.pth [N] int64, testfeat.pth, testlabels.pth (the val set),
  trainfiles.txt / testfiles.txt (row order), features.json (model, classes, sets)
Under torchrun or srun each rank extracts a share and rank 0 writes the files.

Example:
  imagenet-trainer features runs/rn50/checkpoints/last.ckpt --set train=/data/imagenet/train \\
      --set val=/data/imagenet/val --out feats/rn50
  imagenet-trainer knn feats/rn50
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Pooled features (the input of the classifier fc) of a model's frozen backbone on image\n"
                     "sets, under its own validation preprocessing, written in DINO's dump layout for\n"
                     "`imagenet-trainer knn`. MODEL: a .ckpt, an exported .pt/.safetensors, or\n"
                     "wandb:ENTITY/PROJECT/NAME:ALIAS.")
    p.epilog = EPILOG
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=PATH",
                   help="train=PATH and/or val=PATH: a split folder with a folder per class, "
                        "or a root with train/, val/")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder the files are written to")
    p.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="a checkpoint's EMA of the weights or its raw trained weights (default: ema when it has one)")
    p.add_argument("--classes", choices=CLASS_SOURCES, default="model",
                   help="what labels index: the model's classes, each folder a wnid of the model (default), or "
                        "the train set's sorted folders (another dataset)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--backend", choices=["torchvision", "dali_cpu", "dali_gpu"], default="torchvision",
                   help="image decoding and resizing (default torchvision)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers or DALI threads (default 4)")
    p.add_argument("--l2-normalize", action="store_true",
                   help="write L2-normalised features, as DINO's eval_knn.py dumps them (knn normalises either way)")


def main(args: argparse.Namespace) -> int:
    import torch

    from trainer.artifacts.pretrained import load_pretrained

    try:
        if args.batch_size < 1 or args.workers < 0:
            raise FeaturesError(f"--batch-size={args.batch_size} must be at least 1 and --workers={args.workers} "
                                f"0 or more")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise FeaturesError(f"--out {out} is a file, not a folder")
        # Every set's layout before the model is loaded, and long before hours of extraction.
        sets = {name: scan_set(name, path) for name, path in parse_sets(args.sets).items()}
        pretrained = load_pretrained(args.model, weights=args.weights)
        classes = class_index(sets, list(pretrained.classes), args.classes)
    except (FileNotFoundError, ValueError, RuntimeError) as err:  # a bad set; a model that does not load
        print(f"imagenet-trainer features: {err}", file=sys.stderr)
        return 2
    from trainer.artifacts.inference import current_ranks

    dim = 0
    for name, image_set in sets.items():
        try:
            features, labels = extract(pretrained, image_set, classes, batch_size=args.batch_size,
                                       backend=args.backend, workers=args.workers)
        except ValueError as err:  # the model or backend cannot give features (an ONNX file, DALI's mean)
            print(f"imagenet-trainer features: {err}", file=sys.stderr)
            return _finish(2)
        except RuntimeError as err:  # an unreadable image, named (or a peer rank that stopped)
            print(f"imagenet-trainer features: --set {name}: {err}", file=sys.stderr)
            return _finish(1)
        if args.l2_normalize:
            features = torch.nn.functional.normalize(features, dim=1)
        dim = int(features.shape[1])
        if current_ranks().rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_dump(out, name, image_set, features, labels)
            print(f"{name}: {len(image_set.files):,} images of {image_set.path} -> {out / OUTPUTS[name][0]} "
                  f"{tuple(features.shape)}, {out / OUTPUTS[name][1]}")
    if current_ranks().rank == 0:
        from data_pipelines.files import write_atomic

        info = merge_info(out / INFO_FILE, describe(args.model, pretrained, sets, classes, args.classes, dim,
                                                    args.l2_normalize))
        write_atomic(out / INFO_FILE, json.dumps(info, indent=2) + "\n")
        print(f"wrote {out / INFO_FILE}; next: imagenet-trainer knn {out}")
    return _finish(0)


def _finish(code: int) -> int:
    """``code``, once a multi-process launch's group is closed: after a barrier when all went well
    (no rank exits before rank 0 has written the files); at once after a failure, whose rank may
    be alone (its peers' gathers fail when it leaves)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    return code
