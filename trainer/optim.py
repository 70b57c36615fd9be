"""The optimiser, built by name (``optim.name``) from parameter groups and plain arguments.

SGD and AdamW are torch's; LARS and LAMB are timm's (``timm.optim.Lars``, ``timm.optim.Lamb``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")


def layerwise_adaptation(groups: list[dict]) -> list[dict]:
    """``groups`` with timm's per-group ``always_adapt`` set for LARS and LAMB: the trust ratio
    scales the update of conv and linear weights only, never of BatchNorm parameters and biases
    (MLPerf's LARS excludes them from the adaptation as from weight decay; You et al. 2017).

    timm adapts a group when its weight_decay is non-zero or ``always_adapt`` is set: the no-decay
    group (every 1-D parameter, see ``module.param_groups``) stays unadapted, and the weights stay
    adapted even when ``optim.weight_decay=0``.
    """
    return [{**g, "always_adapt": all(p.ndim > 1 for p in g["params"])} for g in groups]


def build_optimizer(
    name: str,
    groups: list[dict],
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: Sequence[float] = (0.9, 0.999),
    eps: Optional[float] = None,
    trust_coeff: float = 0.001,
    impl: Optional[dict[str, bool]] = None,
) -> torch.optim.Optimizer:
    """The optimiser called ``name`` (see ``OPTIMIZERS``) over ``groups`` (each with its weight decay).

    ``momentum``/``nesterov``: sgd and lars. ``betas``: adamw and lamb. ``eps``: adamw, lamb and lars
    (None: the optimiser's own default). ``trust_coeff``: lars' trust coefficient (eta).
    ``impl``: ``{"fused": True}`` or ``{"foreach": True}`` for torch's sgd and adamw
    (``module.sgd_implementation``); timm's optimisers pick foreach themselves.
    Weight decay is what each optimiser does with its group's ``weight_decay``: L2 added to the
    gradient for sgd, lars and lamb (timm's default, as NVIDIA's LAMB), decoupled for adamw.
    """
    impl = dict(impl or {})
    eps_arg = {} if eps is None else {"eps": eps}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **impl)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **eps_arg, **impl)
    if name == "lars":
        from timm.optim import Lars

        return Lars(layerwise_adaptation(groups), lr=lr, momentum=momentum, nesterov=nesterov,
                    trust_coeff=trust_coeff, **eps_arg)
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb(layerwise_adaptation(groups), lr=lr, betas=tuple(betas), **eps_arg)
    raise ValueError(f"optim.name={name!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")
