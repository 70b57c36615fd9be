"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, as DINO's
``eval_knn.py`` runs it): the ``imagenet-trainer knn`` verb and :func:`knn_topk`.

Every feature is L2-normalised, so the similarity of two images is their cosine. A test image's
``k`` most similar training images each vote for their class with weight ``exp(similarity / T)``;
the classes ranked by their summed votes are the prediction (top-1, top-5). The test features are
taken a chunk at a time, so 50,000 x 1,281,167 similarities are never held at once.

As in DINO, every class is ranked, those no neighbour voted for last, and top-5 with k < 5 counts
the first k classes only. Where DINO leaves the order to its sort, here it is fixed: classes with
equal votes (those without any included) rank by class index, lower first.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KS = (10, 20, 100, 200)  # DINO's --nb_knn
TEMPERATURE = 0.07  # DINO's --temperature
TOP = 5  # the ranks kept per test image: top-1 and top-5
# Similarities of one chunk of test images: at most this many (x 4 bytes, and as much again for topk).
_CHUNK_ELEMENTS = 1 << 26
# DINO's dump (eval_knn.py --dump_features): features [N, D] float32, labels [N] int64.
FILES = {"train": ("trainfeat.pth", "trainlabels.pth"), "test": ("testfeat.pth", "testlabels.pth")}


def knn_topk(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             ks: Sequence[int] = KS, temperature: float = TEMPERATURE, num_classes: int | None = None,
             chunk_size: int | None = None, device=None) -> dict[int, torch.Tensor]:
    """For each k of ``ks``: the ``[M, min(5, classes)]`` classes each test image's k neighbours vote
    for most, best first (int64 on the CPU; equal votes by class index). Classes are
    ``0 .. num_classes - 1`` (default: the largest training label + 1); ``chunk_size`` test images
    are compared with every training image at once (default: as many as keep one chunk's
    similarities under 64M values); ``device`` runs the products there (default: the features')."""
    import torch
    import torch.nn.functional as F

    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be [N, D] with one D: train {tuple(train_features.shape)}, "
                         f"test {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"{train_features.shape[0]} training features but labels of shape {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("there are no training features to take neighbours from")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"k={list(ks)}: each k must be at least 1")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be above 0 (DINO's is {TEMPERATURE})")
    if int(train_labels.min()) < 0:
        raise ValueError(f"training labels must be class indices (0 or more); found {int(train_labels.min())}")
    classes = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(train_labels.max()) >= classes:
        raise ValueError(f"a training label is {int(train_labels.max())}, beyond num_classes={classes}")
    device = torch.device(device) if device is not None else train_features.device
    n = train_features.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // n)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be at least 1")
    train_t = F.normalize(train_features.to(device, torch.float32), dim=1).t()
    labels = train_labels.to(device, torch.int64)
    kmax = min(max(int(k) for k in ks), n)
    ranked = {int(k): [] for k in ks}
    for start in range(0, test_features.shape[0], chunk_size):
        test = F.normalize(test_features[start:start + chunk_size].to(device, torch.float32), dim=1)
        # Sorted: the first k of the kmax nearest are the k nearest, for every k at once.
        similarity, index = (test @ train_t).topk(kmax, dim=1, largest=True, sorted=True)
        weight = (similarity / temperature).exp()
        neighbours = labels[index]
        for k in ranked:
            kk = min(k, n)
            votes = torch.zeros(test.shape[0], classes, device=device)
            votes.scatter_add_(1, neighbours[:, :kk], weight[:, :kk])
            # Stable: equal votes keep class order, so the lower class index ranks first.
            ranked[k].append(votes.sort(dim=1, descending=True, stable=True).indices[:, :TOP].cpu())
    width = min(TOP, classes)
    return {k: torch.cat(parts) if parts else torch.zeros(0, width, dtype=torch.int64) for k, parts in ranked.items()}


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Sequence[int] = KS, temperature: float = TEMPERATURE,
                 num_classes: int | None = None, chunk_size: int | None = None,
                 device=None) -> dict[int, dict[str, float]]:
    """``{k: {"top1": fraction, "top5": fraction}}`` of the test images whose label is the first
    (among the first five; the first k when k < 5, as DINO counts) of :func:`knn_topk`'s classes."""
    import torch

    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"{test_features.shape[0]} test features but labels of shape {tuple(test_labels.shape)}")
    if test_features.shape[0] == 0:
        raise ValueError("there are no test features to classify")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    ranked = knn_topk(train_features, train_labels, test_features, ks, temperature, num_classes, chunk_size, device)
    target = test_labels.to(torch.int64).view(-1, 1)
    out = {}
    for k, top in ranked.items():
        hit = top == target
        out[k] = {"top1": hit[:, 0].double().mean().item(), "top5": hit[:, :k].any(dim=1).double().mean().item()}
    return out


def load_dump(folder: str | Path) -> dict[str, torch.Tensor]:
    """DINO's four files in ``folder`` (``trainfeat.pth`` ...): ``train_features``, ``train_labels``,
    ``test_features``, ``test_labels``; a ValueError/FileNotFoundError names the file at fault."""
    import torch

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: give the --out folder of `imagenet-trainer features`")
    out = {}
    for split, (feat_name, label_name) in FILES.items():
        tensors = []
        for name in (feat_name, label_name):
            path = folder / name
            if not path.is_file():
                names = ", ".join(sum(FILES.values(), ()))
                raise FileNotFoundError(f"{path} is missing: a features folder holds {names} (write them with "
                                        f"`imagenet-trainer features MODEL --set train=... --set val=... "
                                        f"--out {folder}`)")
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - refused unpickling or a corrupt file
                raise ValueError(f"cannot read {path} with torch.load ({str(err).splitlines()[0]})") from None
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path} holds a {type(value).__name__}, not a tensor")
            tensors.append(value)
        feats, labels = tensors
        if feats.dim() != 2 or not feats.is_floating_point():
            raise ValueError(f"{folder / feat_name}: expected float features [N, D], found {feats.dtype} "
                             f"{tuple(feats.shape)}")
        if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != feats.shape[0]:
            raise ValueError(f"{folder / label_name}: expected {feats.shape[0]} integer labels (one per row of "
                             f"{feat_name}), found {labels.dtype} {tuple(labels.shape)}")
        out[f"{split}_features"], out[f"{split}_labels"] = feats, labels.to(torch.int64)
    if out["train_features"].shape[1] != out["test_features"].shape[1]:
        raise ValueError(f"{folder}: train features have {out['train_features'].shape[1]} dims and test features "
                         f"{out['test_features'].shape[1]}: they come from different models")
    return out


def _num_classes(folder: Path, dump: dict) -> int:
    """The class count of the features' ``features.json`` (its class list), else the largest label
    + 1; a ValueError when its row counts are not the files' (files of another run left there)."""
    from trainer.artifacts.features import INFO_FILE, OUTPUTS

    found = int(max(int(dump["train_labels"].max()), int(dump["test_labels"].max()))) + 1
    info = folder / INFO_FILE
    if info.is_file():
        try:
            described = json.loads(info.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{info} is not valid JSON ({err})") from None
        for split, name in (("train", "train"), ("test", "val")):
            rows = int(dump[f"{split}_features"].shape[0])
            images = ((described.get("sets") or {}).get(name) or {}).get("images")
            if images != rows:
                what = f"no {name} set" if images is None else f"{images} images"
                raise ValueError(f"{folder / OUTPUTS[name][0]} has {rows} rows but {info} describes {what}: the "
                                 f"files come from different `features` runs; write both sets again into one folder")
        classes = described.get("classes")
        if classes:
            if found > len(classes):
                raise ValueError(f"{folder}: a label is {found - 1} but {info} lists {len(classes)} classes")
            return len(classes)
    return found


def format_table(result: dict, folder: str) -> str:
    lines = [f"kNN on {folder}: {result['train']:,} train and {result['test']:,} test features of "
             f"{result['dim']} dims, {result['num_classes']} classes, T={result['temperature']:g} "
             f"(DINO's weighted vote)",
             f"{'k':>5}  {'top-1':>6}  {'top-5':>6}"]
    for row in result["results"]:
        lines.append(f"{row['k']:>5}  {100 * row['top1']:6.2f}  {100 * row['top5']:6.2f}")
    return "\n".join(lines)


EPILOG = """\
Reads DINO's dump (trainfeat.pth, trainlabels.pth, testfeat.pth, testlabels.pth), as written by
`imagenet-trainer features` or by DINO's eval_knn.py --dump_features. Accuracies are in percent on
the terminal, fractions in --json.

Example:
  imagenet-trainer features runs/rn50/checkpoints/last.ckpt --set train=/data/imagenet/train \\
      --set val=/data/imagenet/val --out feats/rn50
  imagenet-trainer knn feats/rn50
  imagenet-trainer knn feats/rn50 --k 20 --temperature 0.07 --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Weighted k-NN classification of frozen features (DINO's): features L2-normalised,\n"
                     "cosine similarity, the k nearest training images vote exp(similarity / T) for their\n"
                     "class; top-1 and top-5 of the test (val) features for each k.")
    p.epilog = EPILOG
    p.add_argument("folder", metavar="DIR", help="a features folder (`imagenet-trainer features --out DIR`)")
    p.add_argument("--k", type=int, nargs="+", default=list(KS), metavar="K",
                   help=f"neighbour counts (default: DINO's {' '.join(map(str, KS))})")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help=f"T of the votes (default {TEMPERATURE})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="test images compared with every training image at once (default: 64M similarities a chunk)")
    p.add_argument("--device", default=None,
                   help="where the similarities are computed: cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON instead of the table")


def main(args: argparse.Namespace) -> int:
    import torch

    folder = Path(args.folder)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size}: must be at least 1")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dump = load_dump(folder)
        classes = _num_classes(folder, dump)
        accuracy = knn_accuracy(dump["train_features"], dump["train_labels"], dump["test_features"],
                                dump["test_labels"], ks=args.k, temperature=args.temperature, num_classes=classes,
                                chunk_size=args.batch_size, device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"imagenet-trainer knn: {err}", file=sys.stderr)
        return 2
    result = {"folder": str(folder), "train": int(dump["train_features"].shape[0]),
              "test": int(dump["test_features"].shape[0]), "dim": int(dump["train_features"].shape[1]),
              "num_classes": classes, "temperature": args.temperature,
              "results": [{"k": k, **accuracy[k]} for k in accuracy]}
    print(json.dumps(result, indent=2) if args.as_json else format_table(result, str(folder)))
    return 0
