"""From a Lightning checkpoint to files that downstream code loads without this project.

Formats:

- ``torchvision``: ``torch.save`` of a plain state_dict (tensors only). For resnet18/34/50/101/152
  ``torchvision.models.resnet50(num_classes=K).load_state_dict(sd, strict=True)`` accepts it; the
  plain twins and CIFAR-style nets rebuild with ``trainer.recipe.models.build_model(arch, K)``.
- ``safetensors``: the same state_dict as safetensors (no pickle at all), with the metadata
  embedded as well.
- ``onnx``: the network in eval mode, input ``images`` [batch, 3, crop, crop] (float, normalised
  RGB), output ``logits`` [batch, K]; the batch axis is dynamic. Softmax is left to the caller.
- ``hf``: a folder in the Hugging Face Hub layout that timm loads,
  ``timm.create_model("local-dir:OUT", pretrained=True)``: ``config.json`` (timm's fields),
  ``model.safetensors`` and a ``README.md`` model card with the recipe and only measured results.
  resnet18/34/50/101/152 only: timm has no plain, CIFAR-style or Composer-BlurPool ResNet.

Each file gets a JSON sidecar, ``OUT.json`` (``resnet50.onnx`` -> ``resnet50.onnx.json``; for
``hf``, ``OUT/model.safetensors.json``): arch, classes (wnids in index order), their names (words,
or None), preprocessing (resize, crop, mean, std) and where it came from.

Weights: a checkpoint of a run with ``ema.decay`` holds two sets, the trained ("raw") weights and
their exponential moving average ("ema", trainer/recipe/ema.py); the EMA is exported unless
``weights="raw"`` (``--weights raw``), and the sidecar's ``weights`` says which it is.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from data_pipelines import IMAGENET_MEAN, IMAGENET_STD, files

FORMATS = ("torchvision", "safetensors", "onnx", "hf")
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
    ckpt = load_checkpoint(path)
    state_dict, weights = checkpoint_weights(ckpt, weights, str(path))
    return state_dict, {**checkpoint_metadata(ckpt, source=str(path)), "weights": weights}


def load_checkpoint(path: str | Path) -> dict:
    """The Lightning checkpoint at ``path`` as a dict, read with ``weights_only=True``; a
    FileNotFoundError or ValueError says what is wrong with it."""
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
    return ckpt


def checkpoint_metadata(ckpt: dict, source: str) -> dict[str, Any]:
    """What a consumer needs besides the weights: arch, classes, their names, preprocessing, provenance."""
    hp = ckpt["hyper_parameters"]
    config = hp["config"]
    arch = config["model"]["arch"]
    classes = list(hp.get("classes") or [])
    names = checked_names(hp.get("names"), classes, source)
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
        # Each class's words ("tench, Tinca tinca"; "" for an unnamed class), aligned with classes;
        # None when the data named none. Names are for people: ImageNet has two "crane"s.
        "names": names,
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


def checked_names(names: Any, classes: list[str], source: str, field: str = "hyper_parameters['names']",
                  remedy: str = "") -> list[str] | None:
    """``names`` (a checkpoint's ``hyper_parameters["names"]``, or a sidecar's ``field``) when it is
    None or one string per class; else a ValueError naming ``source`` and ``field``."""
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or len(names) != len(classes) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"{source}: {field} must be a list of {len(classes)} strings, one per class "
            f"(\"\" for an unnamed class), or null; found {str(names)[:80]}{remedy}"
        )
    return list(names)


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
    if fmt == "hf":
        return export_hf(ckpt, out, weights)
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


# --- the Hugging Face Hub layout that timm loads (--format hf) ------------------------------------
#
# OUT_DIR/config.json, model.safetensors and README.md, as timm's ``save_for_hf`` and
# ``push_to_hf_hub`` write them (timm/models/_hub.py): ``timm.create_model("local-dir:OUT_DIR",
# pretrained=True)`` builds the network from config.json's ``architecture`` and ``model_args`` and
# loads model.safetensors; ``hf-hub:USER/NAME`` does the same once the folder is uploaded.

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_CARD = "README.md"
HF_FILES = (HF_CONFIG, HF_WEIGHTS, HF_CARD, HF_WEIGHTS + ".json")  # the last: the sidecar
# timm's ResNet has torchvision's module names (conv1, bn1, layer1..4, downsample.0/1, fc), so a
# torchvision state_dict loads into it unchanged; tests/test_export_hf.py checks the keys.
TIMM_ARCHS = TORCHVISION_ARCHS


def default_hf_out(ckpt: str | Path) -> Path:
    """Beside the checkpoint: ``checkpoints/best-epoch005.ckpt`` -> ``checkpoints/best-epoch005-hf/``."""
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.stem + "-hf")


def timm_architecture(arch: str, blurpool: bool) -> str:
    """The timm model name that computes what ``arch`` does; a ValueError when there is none."""
    if blurpool:
        raise ValueError(
            f"model.arch={arch} was trained with model.blurpool=true (a blur before every strided conv, "
            f"Composer's placement); timm's resnetblur* models blur after the conv, so no timm architecture "
            f"computes this network. Export it with --format safetensors and load it with trainer.load_pretrained"
        )
    if arch not in TIMM_ARCHS:
        kind = "a plain net (no shortcuts)" if arch.startswith("plain") else "a CIFAR-style ResNet"
        raise ValueError(
            f"model.arch={arch} is {kind}, which timm has no architecture for: --format hf takes "
            f"{', '.join(TIMM_ARCHS)}. Export it with --format safetensors (or torchvision/onnx) and load it "
            f"with trainer.load_pretrained"
        )
    return arch


def timm_crop_pct(resize: int, crop: int) -> float:
    """``crop / resize`` as timm reads it back: its eval transform resizes the shorter side to
    ``floor(crop / crop_pct)``, and the plain quotient can land a hair under ``resize`` (17 / (17 / 25)
    is 24.999...), which would resize to one pixel less than we validated with."""
    pct = crop / resize
    while math.floor(crop / pct) < resize:
        pct = math.nextafter(pct, 0.0)
    return pct


def hf_config(meta: dict[str, Any], num_features: int, license: str | None = None) -> dict[str, Any]:
    """config.json: what timm's ``save_config_for_hf`` writes for the same network (timm 1.0.31):
    ``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``label_names`` (the wnids,
    in index order), ``label_descriptions`` ({wnid: words} for the named classes), ``model_args``
    and ``pretrained_cfg`` (input size, crop_pct, interpolation, mean, std, first_conv, classifier).
    Only ``PretrainedCfg`` fields go into ``pretrained_cfg``: timm refuses any other key."""
    prep = meta["preprocessing"]
    crop, resize, num_classes = int(prep["crop"]), int(prep["resize"]), int(meta["num_classes"])
    pretrained_cfg: dict[str, Any] = {
        "custom_load": False,
        "input_size": [3, crop, crop],
        "fixed_input_size": False,
        "interpolation": prep["interpolation"],
        "crop_pct": timm_crop_pct(resize, crop),
        "crop_mode": "center",
        "mean": list(prep["mean"]),
        "std": list(prep["std"]),
        "num_classes": num_classes,
        "first_conv": "conv1",
        "classifier": "fc",
    }
    if license:
        pretrained_cfg["license"] = license
    config: dict[str, Any] = {
        "architecture": timm_architecture(meta["arch"], bool(meta.get("blurpool"))),
        "num_classes": num_classes,
        "num_features": int(num_features),
        "global_pool": "avg",
    }
    classes, names = list(meta.get("classes") or []), meta.get("names")
    if len(classes) == num_classes:  # a model with more outputs than classes has no name for some
        config["label_names"] = classes
        described = {c: n for c, n in zip(classes, names or []) if n}
        if described:
            config["label_descriptions"] = described
    config["model_args"] = {"num_classes": num_classes, "in_chans": 3, "global_pool": "avg"}
    config["pretrained_cfg"] = pretrained_cfg
    return config


# --- measured results for the model card ----------------------------------------------------------
# Only numbers a run measured on this checkpoint's weights: the end-of-fit validation in
# summary.json (when this checkpoint is the one it measured), the `validate` JSON beside the run
# (when it is of this checkpoint and newer than it) and result files given with --results.

SUMMARY = "summary.json"
VALIDATE = "validate.json"
RESULT_METRICS = ("top1", "top5", "top1_err", "top5_err", "top1_diff", "ece", "nll", "mce", "relative_mce")


def run_dir_of(ckpt: Path) -> Path:
    """The run directory of a checkpoint: RUN_DIR of ``RUN_DIR/checkpoints/X.ckpt``, else its folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path} as JSON ({err})") from None


def fit_results(ckpt_path: Path, ckpt: dict, weights: str, notes: list[str]) -> list[dict[str, Any]]:
    """The validation of this checkpoint's ``weights`` that the run's summary.json and validate.json
    recorded (accuracies as fractions); why one was left out goes to ``notes``."""
    run_dir = run_dir_of(ckpt_path)
    rows = []
    summary_path = run_dir / SUMMARY
    if summary_path.is_file():
        summary = _read_json(summary_path)
        prefix = "val_ema/" if weights == "ema" else "val/"
        trainer = ckpt["hyper_parameters"]["config"].get("trainer", {})
        every = int(trainer.get("check_val_every_n_epoch") or 1)
        # Lightning validates after epochs that are multiples of check_val_every_n_epoch only: when
        # the last epoch is none, the summary's val/* are of an earlier epoch's weights.
        is_last = (Path(str(summary.get("last_ckpt") or "")).name == ckpt_path.name
                   and summary.get("global_step") == ckpt.get("global_step")
                   and int(trainer.get("max_epochs") or 0) % every == 0)
        is_best = bool(summary.get("best_ckpt")) and Path(str(summary["best_ckpt"])).name == ckpt_path.name
        if is_last and summary.get(prefix + "top1") is not None:
            rows.append({"set": "val", "top1": summary[prefix + "top1"], "top5": summary.get(prefix + "top5"),
                         "images": _count(summary.get("val/images")),
                         # The loader preprocesses val (DALI resizes with its own kernel): say which measured.
                         "source": f"{SUMMARY} (the fit's last validation"
                                   + (f", {summary['backend']} loader)" if summary.get("backend") else ")")})
        elif is_best and weights == "raw" and summary.get("best/val/top1") is not None:
            rows.append({"set": "val", "top1": summary["best/val/top1"], "top5": None, "images": None,
                         "source": f"{SUMMARY} (best/val/top1, the score this checkpoint was kept for)"})
        else:
            notes.append(f"{summary_path} measured another checkpoint or the other weights: not used")
    validate_path = run_dir / VALIDATE
    if validate_path.is_file():
        record = _read_json(validate_path)
        same = (Path(str(record.get("checkpoint") or "")).name == ckpt_path.name
                and record.get("weights", "raw") == weights
                and validate_path.stat().st_mtime >= ckpt_path.stat().st_mtime)
        if same and record.get("top1") is not None:
            rows.append({"set": "val", "top1": record["top1"], "top5": record.get("top5"),
                         "images": _count(record.get("images")), "source": f"{VALIDATE} (imagenet-trainer validate)"})
        else:
            notes.append(f"{validate_path} is of another checkpoint, the other weights, or older than "
                         f"{ckpt_path.name}: not used")
    return rows


def _result_rows(data: Any, path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (accuracies, errors and ECE as fractions, as ``validate`` and
    ``evaluate`` write them): ``{"sets": {NAME: {metric: value}}}``, ``{"sets": [ROW]}``,
    ``{"results": [ROW]}``, ``[ROW]`` (a ROW names its set as ``set`` or ``name``), a plain
    ``{NAME: {metric: value}}``, or one ``validate`` result (``{"top1": ..., "top5": ...}``)."""
    if isinstance(data, dict) and "top1" in data:
        return [{"set": data.get("set", "val"), **data}]
    body = data.get("sets", data.get("results", data)) if isinstance(data, dict) else data
    if isinstance(body, dict) and body and all(isinstance(v, dict) for v in body.values()):
        return [{"set": name, **row} for name, row in body.items()]
    if isinstance(body, list) and body and all(isinstance(r, dict) and ("set" in r or "name" in r) for r in body):
        return [{"set": r.get("set", r.get("name")), **r} for r in body]
    raise ValueError(
        f"{path}: expected the JSON of `imagenet-trainer evaluate --json` or `validate` (sets with their top1, "
        f"top5, ...); found {str(data)[:80]}"
    )


def given_results(paths: list[str | Path], ckpt_path: Path, weights: str) -> list[dict[str, Any]]:
    """The rows of the result files ``paths`` (the values as written there); a ValueError when a
    file is of another checkpoint or the other weights, as far as it names them."""
    rows = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} does not exist")
        data = _read_json(path)
        top = data if isinstance(data, dict) else {}
        # A checkpoint's file name identifies it in its run; an export or a W&B reference cannot be
        # told apart from this checkpoint's own, so those are taken at the user's word.
        model = top.get("checkpoint") or top.get("model")
        if isinstance(model, str) and model.endswith(".ckpt") and Path(model).name != ckpt_path.name:
            raise ValueError(f"{path} holds results of {model}, not of {ckpt_path}: a model card shows only "
                             f"what was measured on the exported weights")
        if top.get("weights") not in (None, weights):
            raise ValueError(f"{path} holds results of the {top['weights']} weights; this export holds the "
                             f"{weights} ones (--weights {top['weights']} exports those)")
        found = []
        for row in _result_rows(data, path):
            metrics = {k: row[k] for k in RESULT_METRICS if isinstance(row.get(k), (int, float))}
            if metrics:  # a row without any (a set's notes) shows nothing
                found.append({"set": str(row["set"]), **metrics, "images": _count(row.get("images")),
                              "source": path.name})
        if not found:
            raise ValueError(f"{path}: no set has any of {', '.join(RESULT_METRICS)}")
        rows += found
    return rows


# --- the model card -------------------------------------------------------------------------------

def _recipe_lines(config: dict, meta: dict) -> list[str]:
    """The training recipe, from the checkpoint's resolved config (configured values, not results)."""
    data, model, optim = config.get("data", {}), config.get("model", {}), config.get("optim", {})
    trainer, aug, ema = config.get("trainer", {}), config.get("aug", {}), config.get("ema", {}) or {}
    optimiser = f"{optim.get('name', 'sgd')}, lr {optim.get('lr')} per 256 images"
    if optim.get("name", "sgd") in ("sgd", "lars"):
        optimiser += f", momentum {optim.get('momentum')}" + (" (Nesterov)" if optim.get("nesterov") else "")
    optimiser += f", weight decay {optim.get('weight_decay')}"
    schedule = f"{optim.get('schedule', 'cosine')} after {optim.get('warmup_epochs', 0)} warmup epochs"
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    batch = f"{data.get('batch_size')} per device" + (f" x {accumulate} accumulated" if accumulate > 1 else "")
    mixing = [f"{k} {aug[k]}" for k in ("mixup_alpha", "cutmix_alpha", "random_erasing") if aug.get(k)]
    if aug.get("auto_augment") not in (None, "none"):
        mixing.insert(0, f"auto_augment {aug['auto_augment']}")
    source = meta["source"]
    lines = [
        f"- **Experiment:** {config.get('experiment') or '(none: the defaults of conf/config.yaml)'}",
        f"- **Architecture:** {model.get('arch')}",
        f"- **Epochs:** {trainer.get('max_epochs')} (trainer.max_epochs); this checkpoint: epoch {source['epoch']} "
        f"(counted from 0), global step {source['global_step']}",
        f"- **Batch size:** {batch}",
        f"- **Optimiser:** {optimiser}",
        f"- **Schedule:** {schedule}",
        f"- **Loss:** {config.get('loss', {}).get('name', 'ce')}, label smoothing {optim.get('label_smoothing', 0.0)}",
        f"- **Training crop:** {data.get('image_size')} px ({aug.get('crop', 'rrc')})"
        + (f"; {', '.join(mixing)}" if mixing else ""),
        f"- **Precision:** {trainer.get('precision')}",
    ]
    if ema.get("decay"):
        lines.append(f"- **EMA:** decay {ema['decay']}")
    return lines


RESULT_HEADINGS = {"top1": "top-1", "top5": "top-5", "top1_err": "top-1 error", "top5_err": "top-5 error",
                   "top1_diff": "top-1 vs val", "ece": "ECE", "nll": "NLL", "mce": "mCE",
                   "relative_mce": "relative mCE"}


def _metric(key: str, value: float) -> str:
    """A result as the card shows it: `validate` and `evaluate` write fractions, shown as %; NLL as is."""
    if key == "nll":
        return f"{value:.4f}"
    return f"{100 * value:+.2f}" if key == "top1_diff" else f"{100 * value:.2f}"


def _count(value: Any) -> int | None:
    """An image count as recorded (summary.json holds metrics as floats: 20.0), or None."""
    return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else None


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.2f}"


def _card(name: str, meta: dict, config: dict, timm_config: dict, param_count: int,
          val_rows: list[dict], eval_rows: list[dict], license: str | None) -> str:
    """README.md: front matter as timm's ``generate_readme`` writes it, the recipe and the results."""
    prep, arch = meta["preprocessing"], timm_config["architecture"]
    front = ["---", "tags:", "- image-classification", "- timm", "- imagenet-trainer",
             "library_name: timm", "pipeline_tag: image-classification"]
    if license:
        front.append(f"license: {license}")
    front.append("---")
    experiment = config.get("experiment")
    lines = [
        *front,
        f"# Model card for {name}",
        "",
        f"A {arch} image classifier with {meta['num_classes']} classes, trained with imagenet-trainer"
        + (f" (experiment `{experiment}`)." if experiment else "."),
        "",
        "## Model Details",
        "- **Model Type:** Image classification",
        f"- **timm architecture:** `{arch}`",
        f"- **Params (M):** {param_count / 1e6:.1f}",
        f"- **Image size:** {prep['crop']} x {prep['crop']} (shorter side resized to {prep['resize']}, "
        f"{prep['interpolation']}, then a centre crop)",
        f"- **Classes:** {meta['num_classes']} "
        + ("(WordNet IDs in config.json's label_names" if "label_names" in timm_config else
           f"(outputs without a class of the data: the checkpoint names {len(meta.get('classes') or [])}, "
           f"so config.json has no label_names")
        + (", their words in label_descriptions)" if "label_descriptions" in timm_config else ")"),
        f"- **Weights:** {meta['weights']}" + (" (the exponential moving average of the trained weights)"
                                               if meta["weights"] == "ema" else " (the trained weights)"),
        f"- **Exported from:** `{Path(meta['source']['checkpoint']).name}`",
        "",
        "## Training recipe",
        *_recipe_lines(config, meta),
        "",
        "## Results",
    ]
    if not val_rows and not eval_rows:
        lines.append("No result was recorded for this checkpoint: no summary.json or validate.json of it beside "
                     "the run, and no results file given. Run `imagenet-trainer validate CKPT` (its validate.json is read "
                     "by itself) or `imagenet-trainer evaluate` (pass its JSON with `--results`), then export again.")
    if val_rows:
        lines += ["Accuracy (%) measured on these weights:", "",
                  "| set | images | top-1 | top-5 | source |", "|---|---|---|---|---|"]
        lines += [f"| {r['set']} | {r['images'] if r['images'] is not None else ''} | {_pct(r['top1'])} | "
                  f"{_pct(r['top5'])} | {r['source']} |" for r in val_rows]
        if (config.get("eval") or {}).get("tta_flip"):
            lines += ["", "Measured with eval.tta_flip (the mean of the image's and its mirror's logits); "
                          "the exported model does not flip."]
    if eval_rows:
        columns = [k for k in RESULT_METRICS if any(k in r for r in eval_rows)]
        lines += ["", "Results given to the export (%; NLL in nats):", "",
                  "| set | images | " + " | ".join(RESULT_HEADINGS[k] for k in columns) + " | source |",
                  "|---|---|" + "---|" * len(columns) + "---|"]
        lines += ["| " + " | ".join([r["set"], str(r["images"] if r["images"] is not None else ""),
                                     *(_metric(k, r[k]) if k in r else "" for k in columns), r["source"]]) + " |"
                  for r in eval_rows]
    lines += [
        "",
        "## Model Usage",
        "```python",
        "import timm, torch",
        "from PIL import Image",
        "",
        f'model = timm.create_model("local-dir:{name}", pretrained=True).eval()  # or "hf-hub:USER/{name}"',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        'logits = model(transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0))',
        "top5 = logits.softmax(1).topk(5)",
        "wnids = model.pretrained_cfg[\"label_names\"]  # class index -> WordNet ID",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_hf(ckpt: str | Path, out: str | Path | None = None, weights: str | None = None,
              results: list[str | Path] = (), license: str | None = None) -> dict[str, Any]:
    """Export the Lightning checkpoint ``ckpt`` as a folder timm loads with ``local-dir:OUT``
    (config.json, model.safetensors, README.md; see ``hf_config`` and ``_card``), with the sidecar
    ``OUT/model.safetensors.json`` (and the same JSON inside model.safetensors' metadata), so that
    ``trainer.load_pretrained(OUT/model.safetensors)`` loads it too.

    ``results``: JSON files of ``evaluate`` or ``validate`` runs of this checkpoint, shown in the
    card's results. ``license``: an SPDX id (``apache-2.0``) for the card and config; none: left out.
    The folder appears whole or not at all; an existing OUT is replaced only when it holds nothing
    but these files. Returns the sidecar's content with ``path``, ``sidecar``, ``results`` (the card's
    rows) and ``notes`` (why a recorded result was left out) added."""
    ckpt_path = Path(ckpt)
    out = Path(out) if out is not None else default_hf_out(ckpt_path)
    if out.exists():
        other = "is a file" if not out.is_dir() else ", ".join(sorted(set(os.listdir(out)) - set(HF_FILES)))
        if other:
            raise ValueError(f"--out {out} exists and {'it ' + other if other == 'is a file' else 'holds ' + other}: "
                             f"--format hf writes a folder of its own; choose a new or empty folder")
    checkpoint = load_checkpoint(ckpt_path)
    state_dict, weights = checkpoint_weights(checkpoint, weights, str(ckpt_path))
    meta = {"format": "hf", **checkpoint_metadata(checkpoint, source=str(ckpt_path)), "weights": weights}
    if "fc.weight" not in state_dict:
        raise ValueError(f"{ckpt_path} has no fc.weight: not a ResNet classifier that timm can load")
    timm_config = hf_config(meta, num_features=state_dict["fc.weight"].shape[1], license=license)
    meta["timm_architecture"] = timm_config["architecture"]
    notes: list[str] = []
    val_rows = fit_results(ckpt_path, checkpoint, weights, notes)
    eval_rows = given_results(list(results), ckpt_path, weights)
    config = checkpoint["hyper_parameters"]["config"]
    # Parameters only, as timm counts them: BatchNorm's running statistics are buffers.
    params = sum(v.numel() for k, v in state_dict.items() if not k.endswith(("running_mean", "running_var",
                                                                              "num_batches_tracked")))
    card = _card(out.name, meta, config, timm_config, params, val_rows, eval_rows, license)
    del checkpoint  # the optimiser state, which can be the size of the weights twice over

    from safetensors.torch import save_file

    tmp = files.temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a try that crashed
    tmp.mkdir(parents=True)
    try:
        # "format": "pt" is what Hugging Face's loaders expect in a torch safetensors file.
        save_file(state_dict, str(tmp / HF_WEIGHTS), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
        (tmp / HF_CONFIG).write_text(json.dumps(timm_config, indent=2) + "\n")
        (tmp / HF_CARD).write_text(card, encoding="utf-8")
        (tmp / (HF_WEIGHTS + ".json")).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():  # only our own files (checked above): the old export makes way
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "path": str(out), "sidecar": str(out / (HF_WEIGHTS + ".json")),
            "results": val_rows + eval_rows, "notes": notes}
