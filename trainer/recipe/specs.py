"""The training hyperparameters as plain frozen dataclasses, built once from the validated config
(``trainer.config``: ``optim_spec``, ``schedule_spec``, ``loss_spec``, ``mix_spec``) and taken as
they are by ``Classifier`` and the name -> builder tables (``optim.OPTIMIZERS``,
``schedules.SCHEDULES``, ``losses.LOSSES``).

The defaults are the library's neutral ones (no weight decay, smoothing, warmup or mixing), as
``Classifier``'s keywords had; a run's recipe and its defaults are the config's (conf/config.yaml).
A checkpoint stores each spec as a plain dict (``as_plain``): ``torch.load(weights_only=True)``
refuses custom classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True, kw_only=True)
class OptimSpec:
    """The optimiser (``optim.*`` in the config). ``lr`` is per 256 images (the Classifier scales it
    by the effective batch); each field names the optimisers that read it."""

    name: str = "sgd"  # a key of trainer.recipe.optim.OPTIMIZERS
    lr: float
    momentum: float = 0.9  # sgd and lars
    nesterov: bool = False  # sgd and lars
    betas: tuple[float, float] = (0.9, 0.999)  # adamw and lamb
    eps: Optional[float] = None  # adamw, lamb and lars; None: the optimiser's own
    trust_coeff: float = 0.001  # lars
    weight_decay: float = 0.0  # never on BatchNorm parameters or biases (module.param_groups)


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """The lr schedule after a linear warmup, in epochs (the Classifier turns them into steps)."""

    name: str = "cosine"  # a key of trainer.recipe.schedules.SCHEDULES
    warmup_epochs: float = 0.0
    milestones: tuple[float, ...] = (30.0, 60.0, 80.0)  # step
    gamma: float = 0.1  # step
    poly_power: float = 2.0  # poly
    peak_epoch: Optional[float] = None  # linear: the peak's epoch; None: the end of the warmup


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    name: str = "ce"  # a key of trainer.recipe.losses.LOSSES
    label_smoothing: float = 0.0


@dataclass(frozen=True, kw_only=True)
class MixSpec:
    """MixUp/CutMix of each training batch (trainer/recipe/mixing.py); both 0: off."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


def as_plain(spec: Any) -> dict:
    """``spec`` as a dict of plain values (tuples as lists): what a checkpoint's hparams may hold."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}
