"""Learning-rate schedules: the multiplier of the peak lr at each optimiser step.

Every schedule starts with the same linear warmup and is stepped per iteration (optimiser step),
as NVIDIA's, torchvision's, FFCV's and MLPerf's recipes do. Each is a small pure function of the
step; ``schedule`` picks one by name (``optim.schedule``) for ``LambdaLR``.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear from 1/warmup_steps at step 0 to 1.0 at step ``warmup_steps - 1``."""
    return (step + 1) / warmup_steps


def _progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far past the warmup ``step`` is: 0.0 at its end, 1.0 at ``total_steps`` (and after)."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based).

    Linear warmup reaching 1.0 at step ``warmup_steps - 1``, then a cosine from 1.0 to 0.0 at
    step ``total_steps``; stepped per iteration, as NVIDIA's and torchvision's recipes do.
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup_steps, total_steps)))


def warmup_linear(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then a straight line from 1.0 down to 0.0 at ``total_steps``.

    FFCV's ResNet schedule (``get_linear_lr`` interpolated per iteration): a triangle peaking at the
    end of the warmup (FFCV's ``lr_peak_epoch``).
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return 1.0 - _progress(step, warmup_steps, total_steps)


def warmup_step(step: int, *, warmup_steps: int, milestones: Sequence[int], gamma: float) -> float:
    """Linear warmup, then ``gamma ** k`` where k milestones (optimiser steps, ascending) are reached.

    Goyal et al.'s and torchvision's original ResNet schedule (divide by 10 at epochs 30, 60, 80).
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return gamma ** bisect.bisect_right(list(milestones), step)


def warmup_poly(step: int, *, warmup_steps: int, total_steps: int, power: float) -> float:
    """Linear warmup, then ``(1 - progress) ** power`` down to 0.0 at ``total_steps``.

    MLPerf's ResNet-50 LARS schedule (polynomial decay, power 2).
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return (1.0 - _progress(step, warmup_steps, total_steps)) ** power


def _cosine(warmup_steps: int, total_steps: int, milestones: Sequence[int], gamma: float, power: float):
    return lambda step: warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps)


def _linear(warmup_steps: int, total_steps: int, milestones: Sequence[int], gamma: float, power: float):
    return lambda step: warmup_linear(step, warmup_steps=warmup_steps, total_steps=total_steps)


def _step(warmup_steps: int, total_steps: int, milestones: Sequence[int], gamma: float, power: float):
    steps = sorted(milestones)
    return lambda step: warmup_step(step, warmup_steps=warmup_steps, milestones=steps, gamma=gamma)


def _poly(warmup_steps: int, total_steps: int, milestones: Sequence[int], gamma: float, power: float):
    return lambda step: warmup_poly(step, warmup_steps=warmup_steps, total_steps=total_steps, power=power)


# name -> builder(warmup_steps, total_steps, milestones (steps), gamma, power) of the multiplier.
# A new schedule is one entry here plus its config fields; validation reads the names from here.
SCHEDULES: dict[str, Callable[..., Callable[[int], float]]] = {
    "cosine": _cosine, "linear": _linear, "step": _step, "poly": _poly,
}


def schedule(name: str, *, warmup_steps: int, total_steps: int, milestones: Sequence[int] = (),
             gamma: float = 0.1, power: float = 2.0) -> Callable[[int], float]:
    """The multiplier function ``step -> float`` of the schedule called ``name`` (see ``SCHEDULES``).

    A closure, not a callable object: ``LambdaLR`` then keeps it out of the checkpoint, and a resume
    uses this run's schedule.
    """
    if name not in SCHEDULES:
        raise ValueError(f"optim.schedule={name!r} is unknown; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](warmup_steps, total_steps, milestones, gamma, power)
