"""From a Lightning checkpoint to files that downstream code loads without this project.

Formats:

- ``torchvision``: ``torch.save`` of a plain state_dict (tensors only). For resnet18/34/50/101/152
  ``torchvision.models.resnet50(num_classes=K).load_state_dict(sd, strict=True)`` accepts it; the
  plain twins and CIFAR-style nets rebuild with ``trainer.recipe.models.build_model(arch, K)``.
- ``safetensors``: the same state_dict as safetensors (no pickle at all), with the metadata
  embedded as well.
- ``onnx``: the network in eval mode, input ``images`` [batch, 3, crop, crop] (float, normalised
  RGB), output ``logits`` [batch, K]; the batch axis is dynamic. Softmax is left to the caller.

Each file gets a JSON sidecar, ``OUT.json`` (``resnet50.onnx`` -> ``resnet50.onnx.json``): arch,
class names (wnids in index order), preprocessing (resize, crop, mean, std) and where it came from.

Weights: a checkpoint of a run with ``ema.decay`` holds two sets, the trained ("raw") weights and
their exponential moving average ("ema", trainer/recipe/ema.py); the EMA is exported unless
``weights="raw"`` (``--weights raw``), and the sidecar's ``weights`` says which it is.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from data_pipelines import IMAGENET_MEAN, IMAGENET_STD, files

FORMATS = ("torchvision", "safetensors", "onnx")
SUFFIXES = {"torchvision": ".pt", "safetensors": ".safetensors", "onnx": ".onnx"}
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
METADATA_KEY = "imagenet_trainer"  # the sidecar's JSON, inside a safetensors file's metadata
# A checkpoint of a fit with ema.decay holds the EMA of the weights (trainer/recipe/ema.py) in
# checkpoint["callbacks"][EMA_KEY]["state_dict"], with the network's own key names.
EMA_KEY = "EMA"
WEIGHTS = ("ema", "raw")  # --weights: the EMA or the raw (trained) weights of a checkpoint


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def default_out(ckpt: str | Path, fmt: str) -> Path:
    """Beside the checkpoint: ``checkpoints/best-epoch005.ckpt`` -> ``checkpoints/best-epoch005.pt``."""
    return Path(ckpt).with_suffix(SUFFIXES[fmt])


def plain_state_dict(lightning_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own weights out of a ``Classifier`` state_dict: torchvision's key names.

    Drops the ``model.`` prefix (and ``_orig_mod.``, which torch.compile adds); keeps nothing else
    (metric states and the loss hold no weights). Tensors are made contiguous (channels_last
    training) and detached, as safetensors and plain consumers expect.
    """
    out = {}
    for key, value in lightning_state_dict.items():
        if not key.startswith("model."):
            continue
        key = key[len("model."):]
        if key.startswith("_orig_mod."):
            key = key[len("_orig_mod."):]
        out[key] = value.detach().cpu().contiguous()
    if not out:
        raise ValueError("the checkpoint's state_dict has no 'model.*' weights: is it an imagenet-trainer checkpoint?")
    return out


def ema_state_dict(ckpt: dict) -> dict[str, torch.Tensor] | None:
    """The EMA weights in Lightning checkpoint ``ckpt`` (the network's key names), or None."""
    state = (ckpt.get("callbacks") or {}).get(EMA_KEY) or {}
    return state.get("state_dict")


def choose_weights(ckpt: dict, weights: str | None, source: str) -> str:
    """``"ema"`` or ``"raw"``: ``weights`` checked against ``ckpt``; None picks the EMA when the
    checkpoint holds one, else the raw weights. A ValueError names what is wrong."""
    has_ema = ema_state_dict(ckpt) is not None
    if weights is None:
        return "ema" if has_ema else "raw"
    if weights not in WEIGHTS:
        raise ValueError(f"--weights {weights!r} is unknown; choose one of: {', '.join(WEIGHTS)}")
    if weights == "ema" and not has_ema:
        raise ValueError(f"{source} holds no EMA weights (it was trained without ema.decay); use --weights raw")
    return weights


def checkpoint_weights(ckpt: dict, weights: str | None, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The network's state_dict in ``ckpt`` (torchvision's key names, contiguous, on the CPU): the
    EMA or the raw weights as ``choose_weights`` picks them; and which (``"ema"`` or ``"raw"``)."""
    weights = choose_weights(ckpt, weights, source)
    if weights == "raw":
        return plain_state_dict(ckpt["state_dict"]), weights
    return {k: v.detach().cpu().contiguous() for k, v in ema_state_dict(ckpt).items()}, weights


def read_checkpoint(path: str | Path, weights: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The plain state_dict and the metadata (see ``checkpoint_metadata``) of a Lightning checkpoint;
    ``weights``: ``"ema"``, ``"raw"`` or None (the EMA when it has one), said in the metadata's ``weights``.

    Loaded with ``weights_only=True``: a checkpoint from elsewhere cannot run code when read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling refused or a corrupt file: say which
        raise ValueError(
            f"cannot read {path} as a checkpoint with weights_only=True ({str(err).splitlines()[0]}); "
            f"only imagenet-trainer checkpoints and exports (which hold tensors and plain data) load"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        raise ValueError(
            f"{path} is not an imagenet-trainer checkpoint (no state_dict, or no config in its hyper_parameters)"
        )
    state_dict, weights = checkpoint_weights(ckpt, weights, str(path))
    return state_dict, {**checkpoint_metadata(ckpt, source=str(path)), "weights": weights}


def checkpoint_metadata(ckpt: dict, source: str) -> dict[str, Any]:
    """What a consumer needs besides the weights: arch, classes, preprocessing, provenance."""
    hp = ckpt["hyper_parameters"]
    config = hp["config"]
    arch = config["model"]["arch"]
    classes = list(hp.get("classes") or [])
    num_classes = int(hp.get("num_classes") or config["model"].get("num_classes") or len(classes))
    data = config["data"]
    # A BlurPool net has torchvision's weights but not its forward: torchvision's builder would
    # load them and compute something else; build_model(arch, K, blurpool=True) rebuilds it.
    blurpool = bool(config["model"].get("blurpool", False))
    return {
        "arch": arch,
        "num_classes": num_classes,
        "blurpool": blurpool,
        "classes": classes,
        # The validation crop: data.val_image_size when set (older configs have no such key).
        "preprocessing": preprocessing(int(data["val_resize"]), int(data.get("val_image_size") or data["image_size"])),
        "torchvision_builder": f"torchvision.models.{arch}" if arch in TORCHVISION_ARCHS and not blurpool else None,
        "source": {
            "checkpoint": source,
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "experiment": config.get("experiment"),
        },
    }


def preprocessing(resize: int, crop: int) -> dict[str, Any]:
    """Validation preprocessing, as ``data_pipelines.torchvision_loader.val_transform`` does it."""
    return {
        "resize": resize,  # shorter side, bilinear with antialias
        "crop": crop,  # centre crop, square
        "mean": list(IMAGENET_MEAN),  # on RGB scaled to [0, 1]
        "std": list(IMAGENET_STD),
        "interpolation": "bilinear",
        "color": "RGB",
        "layout": "NCHW",
    }


def _atomic(out: Path, write) -> None:
    """``write(tmp)`` makes the file, renamed over ``out`` (files.atomic_path)."""
    with files.atomic_path(out, fsync=False) as tmp:
        write(tmp)


def _write_sidecar(out: Path, meta: dict) -> Path:
    side = sidecar_path(out)
    files.write_atomic(side, json.dumps(meta, indent=2) + "\n", fsync=False)
    return side


def build_network(meta: dict, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The network named in ``meta`` with ``state_dict`` loaded (strictly), in eval mode."""
    from trainer.recipe.models import build_model

    model = build_model(meta["arch"], int(meta["num_classes"]), blurpool=bool(meta.get("blurpool", False)))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def export_onnx(model: torch.nn.Module, out: Path, crop: int, opset: int | None = None) -> None:
    """ONNX with input ``images`` and output ``logits``, the batch axis dynamic."""
    try:
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise RuntimeError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'imagenet-trainer[export]'"
        ) from None
    example = torch.randn(2, 3, crop, crop)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=1 << 16)

    def write(tmp: Path) -> None:
        # The exporter prints its progress, and its optimiser logs every rewrite at INFO.
        quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                torch.onnx.export(
                    model.eval(), (example,), str(tmp), dynamo=True, external_data=False, verbose=False,
                    input_names=["images"], output_names=["logits"], dynamic_shapes=({0: batch},),
                    opset_version=opset,
                )
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)

    _atomic(out, write)


def export_checkpoint(ckpt: str | Path, out: str | Path | None = None, fmt: str = "torchvision",
                      weights: str | None = None) -> dict[str, Any]:
    """Export the Lightning checkpoint ``ckpt`` as ``fmt`` to ``out`` (default: beside it) with its
    JSON sidecar; returns the sidecar's content, with ``path`` and ``sidecar`` added. ``weights``:
    ``"ema"``, ``"raw"`` or None (the EMA when the checkpoint holds one; the sidecar says which)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is unknown; choose one of: {', '.join(FORMATS)}")
    state_dict, meta = read_checkpoint(ckpt, weights)
    out = Path(out) if out is not None else default_out(ckpt, fmt)
    meta = {"format": fmt, **meta}
    if fmt == "torchvision":
        _atomic(out, lambda tmp: torch.save(state_dict, tmp))
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        _atomic(out, lambda tmp: save_file(state_dict, str(tmp), metadata={METADATA_KEY: json.dumps(meta)}))
    else:
        meta["input"] = {"name": "images", "shape": ["batch", 3, meta["preprocessing"]["crop"],
                                                    meta["preprocessing"]["crop"]], "dtype": "float32"}
        meta["output"] = {"name": "logits", "shape": ["batch", meta["num_classes"]]}
        export_onnx(build_network(meta, state_dict), out, meta["preprocessing"]["crop"])
    side = _write_sidecar(out, meta)
    return {**meta, "path": str(out), "sidecar": str(side)}
