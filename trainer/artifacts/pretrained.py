"""Loading a trained model for use elsewhere: ``trainer.load_pretrained(path)``.

    model, preprocess, classes, meta = trainer.load_pretrained("runs/rn50/checkpoints/last.ckpt")
    probs = model(preprocess(PIL_image).unsqueeze(0)).softmax(1)
    trainer.load_pretrained(path).names  # each class's words ("tench, Tinca tinca"), or None

Sources: a Lightning checkpoint (``.ckpt``), a file written by ``imagenet-trainer export``
(``.pt``, ``.safetensors`` or ``.onnx``, with its ``.json`` sidecar) or a W&B artifact reference
(``wandb:ENTITY/PROJECT/model-RUNID:best``). Nothing loaded here is unpickled into arbitrary
objects: torch files are read with ``weights_only=True``, safetensors and ONNX hold no code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from trainer.artifacts.export import METADATA_KEY, build_network, checked_names, read_checkpoint, sidecar_path

ARTIFACT_PREFIX = "wandb:"
# ENTITY/PROJECT/NAME:ALIAS, or PROJECT/NAME:ALIAS (the API key's default entity)
_ARTIFACT_RE = re.compile(r"^([\w.-]+/){1,2}[\w.-]+:[\w.-]+$")
_LOAD_ORDER = (".ckpt", ".safetensors", ".pt", ".pth", ".onnx")


class Pretrained(NamedTuple):
    model: nn.Module  # eval mode, on the CPU; returns logits
    preprocess: Callable  # PIL image -> normalised float tensor [3, crop, crop]
    classes: list[str]  # class names (wnids) in index order
    meta: dict[str, Any]  # arch, num_classes, preprocessing {resize, crop, mean, std}, source, format, names

    @property
    def names(self) -> Optional[list[str]]:
        """Each class's words ("tench, Tinca tinca"), aligned with ``classes`` ("" for an unnamed
        class), or None when the model's data named none (and for checkpoints older than names).
        A property, not a fifth field, so that ``model, preprocess, classes, meta = ...`` still
        unpacks. Names are not unique (ImageNet has two "crane"s): the wnids identify classes."""
        return self.meta.get("names")


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime behind the ``nn.Module`` call interface (CPU)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError(f"{path} is ONNX, which needs onnxruntime: pip install 'imagenet-trainer[export]'") from None
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


def preprocess_transform(prep: dict[str, Any]):
    """The validation transform that ``prep`` (a sidecar's ``preprocessing``) describes."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(int(prep["resize"])),
        transforms.CenterCrop(int(prep["crop"])),
        transforms.ToTensor(),
        transforms.Normalize(prep["mean"], prep["std"]),
    ])


def _read_sidecar(path: Path) -> Optional[dict]:
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{side} is not valid JSON ({err}); re-export {path} with `imagenet-trainer export`") from None


def _need_sidecar(path: Path, meta: Optional[dict]) -> dict:
    if meta is None:
        raise ValueError(
            f"{path} has no sidecar {sidecar_path(path).name} beside it: the arch, classes and preprocessing "
            f"are in it. Keep the two files together, or export again with `imagenet-trainer export CKPT`"
        )
    return meta


_KINDS = {".ckpt": "lightning", ".safetensors": "safetensors", ".pt": "torchvision", ".pth": "torchvision",
          ".onnx": "onnx"}


def _kind(path: Path) -> Optional[str]:
    """What ``path`` holds: by its suffix, else by its sidecar's ``format``."""
    kind = _KINDS.get(path.suffix.lower())
    if kind is None:
        kind = (_read_sidecar(path) or {}).get("format")
    return kind


def _check_export_weights(path: Path, meta: dict, weights: Optional[str]) -> None:
    """An export holds one set of weights (its sidecar's ``weights``; raw before EMA existed):
    asking for the other is an error that says how to get it."""
    held = meta.get("weights", "raw")
    if weights is not None and weights != held:
        raise ValueError(
            f"{path} holds the {held} weights, not the {weights} ones; export the checkpoint again with "
            f"`imagenet-trainer export CKPT --weights {weights}`, or load the .ckpt itself"
        )


def _load_file(path: Path, weights: Optional[str] = None) -> Pretrained:
    kind = _kind(path)
    if kind == "lightning":
        state_dict, meta = read_checkpoint(path, weights)
        meta = {"format": "lightning", **meta}
        model = build_network(meta, state_dict)
    elif kind == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        meta = _read_sidecar(path)
        if meta is None:
            with safe_open(str(path), framework="pt") as f:
                embedded = (f.metadata() or {}).get(METADATA_KEY)
            meta = json.loads(embedded) if embedded else None
        meta = _need_sidecar(path, meta)
        _check_export_weights(path, meta, weights)
        model = build_network(meta, load_file(str(path)))
    elif kind == "torchvision":
        meta = _need_sidecar(path, _read_sidecar(path))
        _check_export_weights(path, meta, weights)
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - refused unpickling or a corrupt file
            raise ValueError(f"cannot read {path} with weights_only=True ({str(err).splitlines()[0]})") from None
        model = build_network(meta, state_dict)
    elif kind == "onnx":
        meta = _need_sidecar(path, _read_sidecar(path))
        _check_export_weights(path, meta, weights)
        model = OnnxModel(path).eval()
    else:
        raise ValueError(
            f"{path}: unknown model file type {path.suffix!r} and no sidecar naming its format; load_pretrained "
            f"takes a .ckpt, an export (.pt, .safetensors, .onnx with its .json sidecar) or a W&B artifact "
            f"reference wandb:ENTITY/PROJECT/NAME:ALIAS"
        )
    classes = list(meta.get("classes") or [])
    # A checkpoint's names are checked as it is read (export.checkpoint_metadata); an export's sidecar
    # may be older than names (None) or edited by hand.
    where = path if path.suffix.lower() == ".ckpt" else sidecar_path(path)
    meta["names"] = checked_names(meta.get("names"), classes, str(where), field="'names'",
                                  remedy=". Fix or remove it, or export the checkpoint again")
    return Pretrained(model, preprocess_transform(meta["preprocessing"]), classes, meta)


def _model_file_in(folder: Path) -> Path:
    """The one model file of a downloaded artifact (a Lightning artifact holds ``model.ckpt``)."""
    for suffix in _LOAD_ORDER:
        found = sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file())
        if found:
            return found[0]
    raise ValueError(f"the W&B artifact downloaded to {folder} holds no model file ({', '.join(_LOAD_ORDER)})")


def download_artifact(ref: str, root: Optional[str | Path] = None) -> Path:
    """Download the W&B artifact ``ref`` (``ENTITY/PROJECT/NAME:ALIAS``); returns its folder."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(f"{ARTIFACT_PREFIX}{ref} is a W&B artifact, which needs wandb: pip install wandb") from None
    if root is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = cache / "imagenet-trainer" / "artifacts" / ref.replace("/", "_").replace(":", "_")
    artifact = wandb.Api().artifact(ref, type="model")
    return Path(artifact.download(root=str(root)))


def load_pretrained(path: str | Path, *, weights: Optional[str] = None,
                    download_root: Optional[str | Path] = None) -> Pretrained:
    """The model at ``path`` in eval mode, with its preprocessing, class names and metadata.

    ``path``: a Lightning ``.ckpt``, an exported ``.pt``/``.safetensors``/``.onnx`` (its
    ``.json`` sidecar beside it), an ``export --format hf`` folder or ``wandb:ENTITY/PROJECT/NAME:ALIAS`` (downloaded to
    ``download_root``, by default under ``~/.cache/imagenet-trainer/artifacts``).

    ``weights``: ``"ema"`` or ``"raw"`` for a checkpoint of a run that kept an EMA (``ema.decay``);
    None takes the EMA when there is one. An export holds one set (``meta["weights"]``): asking for
    the other is a ValueError.
    """
    text = str(path)
    if text.startswith(ARTIFACT_PREFIX):
        ref = text[len(ARTIFACT_PREFIX):]
        folder = download_artifact(ref, download_root)
        result = _load_file(_model_file_in(folder), weights)
        result.meta["artifact"] = ref
        return result
    file = Path(path)
    if file.is_dir() and (file / "config.json").is_file() and (file / "model.safetensors").is_file():
        file = file / "model.safetensors"  # an `export --format hf` folder: its sidecar is inside
    if not file.is_file():
        if _ARTIFACT_RE.match(text):
            raise FileNotFoundError(f"{text} is not a file; for a W&B artifact write {ARTIFACT_PREFIX}{text}")
        raise FileNotFoundError(f"model file {file} does not exist")
    return _load_file(file, weights)
