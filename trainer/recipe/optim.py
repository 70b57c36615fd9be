"""The optimiser, built by name (``optim.name``) from parameter groups and an ``OptimSpec``.

SGD and AdamW are torch's; LARS and LAMB are timm's (``timm.optim.Lars``, ``timm.optim.Lamb``).
A new optimiser is one entry of ``OPTIMIZERS`` plus its config fields (``config.OptimConfig``,
``specs.OptimSpec``, conf/config.yaml); validation reads the allowed names from the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from trainer.recipe.specs import OptimSpec


def layerwise_adaptation(groups: list[dict]) -> list[dict]:
    """``groups`` with timm's per-group ``always_adapt`` set for LARS and LAMB: the trust ratio
    scales the update of conv and linear weights only, never of BatchNorm parameters and biases
    (MLPerf's LARS excludes them from the adaptation as from weight decay; You et al. 2017).

    timm adapts a group when its weight_decay is non-zero or ``always_adapt`` is set: the no-decay
    group (every 1-D parameter, see ``module.param_groups``) stays unadapted, and the weights stay
    adapted even when ``optim.weight_decay=0``.
    """
    return [{**g, "always_adapt": all(p.ndim > 1 for p in g["params"])} for g in groups]


def _eps(spec: OptimSpec) -> dict:
    return {} if spec.eps is None else {"eps": spec.eps}


def _sgd(groups: list[dict], spec: OptimSpec, lr: float, impl: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov, **impl)


def _adamw(groups: list[dict], spec: OptimSpec, lr: float, impl: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(spec.betas), **_eps(spec), **impl)


def _lars(groups: list[dict], spec: OptimSpec, lr: float, impl: dict) -> torch.optim.Optimizer:
    from timm.optim import Lars

    return Lars(layerwise_adaptation(groups), lr=lr, momentum=spec.momentum, nesterov=spec.nesterov,
                trust_coeff=spec.trust_coeff, **_eps(spec))


def _lamb(groups: list[dict], spec: OptimSpec, lr: float, impl: dict) -> torch.optim.Optimizer:
    from timm.optim import Lamb

    return Lamb(layerwise_adaptation(groups), lr=lr, betas=tuple(spec.betas), **_eps(spec))


@dataclass(frozen=True)
class OptimizerEntry:
    """How to build one optimiser: ``build(groups, spec, lr, impl)``. ``torch_impl``: it takes torch's
    fused/foreach choice (``module.sgd_implementation``), which must survive a checkpoint load
    (``module.keep_implementation``); timm's optimisers pick foreach themselves."""

    build: Callable[[list[dict], OptimSpec, float, dict], torch.optim.Optimizer]
    torch_impl: bool = False


# Weight decay is what each optimiser does with its group's ``weight_decay``: L2 added to the
# gradient for sgd, lars and lamb (timm's default, as NVIDIA's LAMB), decoupled for adamw.
OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(_sgd, torch_impl=True),
    "lars": OptimizerEntry(_lars),
    "lamb": OptimizerEntry(_lamb),
    "adamw": OptimizerEntry(_adamw, torch_impl=True),
}


def optimizer_entry(name: str) -> OptimizerEntry:
    """``OPTIMIZERS[name]``, or a ValueError naming the choices."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def build_optimizer(spec: OptimSpec, groups: list[dict], *, lr: Optional[float] = None,
                    impl: Optional[dict[str, bool]] = None) -> torch.optim.Optimizer:
    """The optimiser ``spec.name`` over ``groups`` (each with its weight decay), at ``lr`` (the run's
    peak lr; None: ``spec.lr`` as it is). ``impl``: ``{"fused": True}`` or ``{"foreach": True}``,
    used by the entries with ``torch_impl`` only."""
    entry = optimizer_entry(spec.name)
    return entry.build(groups, spec, spec.lr if lr is None else lr, dict(impl or {}) if entry.torch_impl else {})
