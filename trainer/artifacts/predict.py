"""Top-k classes of image files: ``imagenet-trainer predict MODEL PATH... [--topk 5] [--json]``.

MODEL is anything ``trainer.load_pretrained`` takes. PATHs are image files or folders (searched
recursively). Images go through the model's own validation preprocessing, in batches.
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


@torch.inference_mode()
def predict_files(pretrained: Pretrained, files: Sequence[str | Path], topk: int = 5, batch_size: int = 32) -> list[dict]:
    """One result per file, in order: ``{"path", "topk": [{"class", "index", "prob"}, ...]}``, or
    ``{"path", "error"}`` for a file that cannot be decoded (the others still get predictions)."""
    from data_pipelines.torchvision_loader import load_rgb

    model, preprocess, classes = pretrained.model, pretrained.preprocess, pretrained.classes
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
                {"class": _class_name(classes, i), "index": i, "prob": p} for p, i in zip(vals, idxs)
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
    """One line per file: ``PATH  CLASS PROB  CLASS PROB ...``."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']}  ERROR {r['error']}")
        else:
            lines.append(f"{r['path']}  " + "  ".join(f"{t['class']} {t['prob']:.4f}" for t in r["topk"]))
    return "\n".join(lines)
