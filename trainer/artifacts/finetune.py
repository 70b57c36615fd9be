"""Fine-tuning: trained weights in a freshly built network before training, and a frozen backbone.

``read_weights(path)`` reads a torchvision-layout state_dict from a ``torch.save`` file (e.g.
torchvision's own ResNet weights), a safetensors file, or one of our checkpoints (``.ckpt``: its EMA
weights when it kept one, see trainer/recipe/ema.py) or exports; ``load_weights`` copies it into the
network, leaving the classifier freshly initialised when the class counts differ.
``freeze_backbone`` stops everything but the classifier from learning. trainer/run.py's
``build_module`` calls them for ``model.init_from`` and ``model.freeze``; nothing here reads the
config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

HEAD = "fc"  # the classifier of every network in trainer.recipe.models.ARCHS (torchvision's name)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_LISTED = 8  # keys named in an error, the rest counted


def read_weights(path: str | Path, weights: Optional[str] = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state_dict in ``path`` with the network's own key names, and what the file was (said in
    the log). ``weights`` (``"ema"``, ``"raw"``, None: the EMA when there is one) picks the set of an
    imagenet-trainer checkpoint. A ValueError (FileNotFoundError) says what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "a safetensors file"
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]})") from None
    try:
        # weights_only: a file from elsewhere must not run code when read.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - refused unpickling, or not a torch file at all: say which
        raise ValueError(
            f"cannot read {path} with torch.load(weights_only=True) ({str(err).splitlines()[0]}); a whole "
            f"pickled model does not load: save its state_dict instead (torch.save(model.state_dict(), PATH))"
        ) from None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        from trainer.artifacts.export import checkpoint_weights

        if "config" not in (loaded.get("hyper_parameters") or {}):
            raise ValueError(f"{path} is a checkpoint but not an imagenet-trainer one (no config in its "
                             f"hyper_parameters); save the network's state_dict itself")
        state_dict, chosen = checkpoint_weights(loaded, weights, str(path))
        return state_dict, f"an imagenet-trainer checkpoint, its {chosen} weights"
    if not (isinstance(loaded, Mapping) and loaded and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())):
        what = f"an empty {type(loaded).__name__}" if not loaded else f"a {type(loaded).__name__}"
        raise ValueError(f"{path} holds {what}, not a state_dict (a mapping of names to tensors)")
    state_dict = dict(loaded)
    if all(k.startswith("module.") for k in state_dict):  # saved from a DistributedDataParallel wrapper
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict, "a state_dict"


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def reset_head(model: nn.Module) -> None:
    """The classifier freshly initialised as DINO's linear probe does (``eval_linear.py``'s
    LinearClassifier: weight normal(0, 0.01), bias 0), whatever weights were loaded into it."""
    head = getattr(model, HEAD)
    with torch.no_grad():
        head.weight.normal_(mean=0.0, std=0.01)
        head.bias.zero_()


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> Optional[str]:
    """Copy ``state_dict`` into ``model`` in place. When the classifier (``fc``) has another class
    count, it keeps its fresh initialisation and the returned message names both counts (None when
    everything was copied). Any other missing, unexpected or mis-shaped key is a ValueError naming
    the keys."""
    own = model.state_dict()
    given = dict(state_dict)
    note = None
    head = f"{HEAD}.weight"
    if head in given and head in own and given[head].shape != own[head].shape \
            and given[head].shape[1:] == own[head].shape[1:]:
        note = (f"{source} has {given[head].shape[0]} classes and this model {own[head].shape[0]}: "
                f"its classifier ({HEAD}) is re-initialised, every other weight is copied")
        given = {k: v for k, v in given.items() if not k.startswith(f"{HEAD}.")}
    missing = [k for k in own if k not in given and not (note and k.startswith(f"{HEAD}."))]
    unexpected = [k for k in given if k not in own]
    misshaped = [f"{k} {tuple(given[k].shape)} (this model: {tuple(own[k].shape)})"
                 for k in given if k in own and given[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listed(unexpected)})")
    if misshaped:
        problems.append(f"{len(misshaped)} of another shape ({_listed(misshaped)})")
    if problems:
        raise ValueError(f"{source} does not fit this network (another model.arch?): keys "
                         + "; ".join(problems))
    model.load_state_dict(given, strict=note is None)  # not strict only for the dropped classifier
    return note


def _stay_in_eval(module: nn.Module, args) -> None:
    """Forward pre-hook: a frozen BatchNorm normalises with its running statistics and never
    updates them, whatever ``model.train()`` set."""
    if module.training:
        module.eval()


def freeze_backbone(model: nn.Module) -> int:
    """Freeze everything but the classifier (``fc``): no gradients, and every BatchNorm layer in eval
    mode now and at each forward (a pre-hook), so that its running statistics do not move. Returns
    the number of frozen parameter tensors."""
    frozen = 0
    for name, param in model.named_parameters():
        if not name.startswith(f"{HEAD}."):
            param.requires_grad_(False)
            frozen += 1
    for module in model.modules():
        if isinstance(module, _BATCHNORMS):
            # eval() now: Lightning keeps each module's mode through the fit (it saves and restores
            # them around validation), and the mode survives SyncBatchNorm's conversion of the layer,
            # which drops hooks; the hook covers a later model.train().
            module.eval()
            module.register_forward_pre_hook(_stay_in_eval)
    return frozen
