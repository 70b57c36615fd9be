"""Top-k classes of image files: ``imagenet-trainer predict MODEL PATH... [--topk 5] [--json]``.

MODEL is anything ``trainer.load_pretrained`` takes. PATHs are image files or folders (searched
recursively). Images go through the model's own validation preprocessing, in batches.

Each prediction is a class's wnid, its short name when the model knows its classes' words (from
the data it was trained on: a pack's manifest, a tree's synset_words.txt) and its probability:
``n01440764 tench 0.9300``. Names are not unique (ImageNet has two "crane"s): the wnid identifies.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from trainer.artifacts.pretrained import Pretrained

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff", ".gif"}


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Every image under ``paths``: files as given, folders searched recursively (sorted)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise FileNotFoundError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return found


def _class_name(classes: Sequence[str], index: int) -> str:
    # A model may have more outputs than named classes (model.num_classes set above the data's).
    return classes[index] if index < len(classes) else f"#{index}"


def _short_name(names: Sequence[str] | None, index: int) -> str | None:
    """The first of class ``index``'s words ("tench" of "tench, Tinca tinca"); None when unknown."""
    from data_pipelines.layout import short_name

    if names is None or index >= len(names):
        return None
    return short_name(names[index]) or None


@torch.inference_mode()
def predict_files(pretrained: Pretrained, files: Sequence[str | Path], topk: int = 5, batch_size: int = 32) -> list[dict]:
    """One result per file, in order: ``{"path", "topk": [{"class", "name", "index", "prob"}, ...]}``
    (``class``: the wnid; ``name``: its short name, None when the model has no names), or
    ``{"path", "error"}`` for a file that cannot be decoded (the others still get predictions)."""
    from data_pipelines.torchvision_loader import load_rgb

    model, preprocess, classes, names = pretrained.model, pretrained.preprocess, pretrained.classes, pretrained.names
    results: list[dict] = []
    batch: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not batch:
            return
        probs = model(torch.stack([t for _, t in batch])).float().softmax(dim=1)
        k = min(topk, probs.shape[1])
        values, indices = probs.topk(k, dim=1)
        for (slot, _), vals, idxs in zip(batch, values.tolist(), indices.tolist()):
            results[slot]["topk"] = [
                {"class": _class_name(classes, i), "name": _short_name(names, i), "index": i, "prob": p}
                for p, i in zip(vals, idxs)
            ]
        batch.clear()

    for file in files:
        results.append({"path": str(file)})
        try:
            tensor = preprocess(load_rgb(str(file)))
        except Exception as err:  # noqa: BLE001 - report the file, go on with the rest
            results[-1]["error"] = str(err)
            continue
        batch.append((len(results) - 1, tensor))
        if len(batch) >= batch_size:
            flush()
    flush()
    return results


def format_results(results: Sequence[dict]) -> str:
    """One line per file: ``PATH  CLASS [NAME] PROB  CLASS [NAME] PROB ...`` (two spaces between
    predictions; a name, which may hold spaces, only where known)."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']}  ERROR {r['error']}")
        else:
            lines.append(f"{r['path']}  " + "  ".join(_entry(t) for t in r["topk"]))
    return "\n".join(lines)


def _entry(t: dict) -> str:
    return f"{t['class']} {t['name']} {t['prob']:.4f}" if t.get("name") else f"{t['class']} {t['prob']:.4f}"
