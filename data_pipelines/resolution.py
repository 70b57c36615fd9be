"""Progressive resizing: the training crop size of each epoch, one rule for every backend.

FFCV's rule (``get_resolution`` in ffcv-imagenet's ``train_imagenet.py``): ``start_size`` up to
epoch ``start_epoch``, ``end_size`` from epoch ``end_epoch`` on, and in between a linear ramp
rounded to the nearest multiple of ``step`` px (FFCV's 32; numpy's rounding: halves to even). Epochs count from 0.
Small images early make the first epochs cheap; the network ends training at the size it is
validated near. The size is a pure function of the epoch, so a run resumed mid-ramp trains each
epoch at the size the uninterrupted run would have.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



@dataclass(frozen=True)
class ResolutionSchedule:
    """Training crop size ramped from ``start_size`` (epochs <= ``start_epoch``) to ``end_size``
    (epochs >= ``end_epoch``). Checked when made, naming the bad value."""

    start_size: int
    end_size: int
    start_epoch: int
    end_epoch: int
    step: int = 32  # px between ramp sizes: FFCV's 32; smaller for small images (a scaled-down proxy)

    def __post_init__(self) -> None:
        if self.start_size < 1 or self.end_size < 1:
            raise ValueError(f"sizes must be positive, got start_size={self.start_size}, end_size={self.end_size}")
        if self.start_size > self.end_size:  # FFCV asserts min_res <= max_res
            raise ValueError(f"start_size={self.start_size} is larger than end_size={self.end_size}")
        if not 0 <= self.start_epoch <= self.end_epoch:
            raise ValueError(f"need 0 <= start_epoch <= end_epoch, got {self.start_epoch} and {self.end_epoch}")
        if self.step < 1:
            raise ValueError(f"step={self.step} must be at least 1 px")

    def size(self, epoch: int) -> int:
        """The training crop size of ``epoch`` (0-based)."""
        if epoch <= self.start_epoch:
            return self.start_size
        if epoch >= self.end_epoch:
            return self.end_size
        size = np.interp(epoch, [self.start_epoch, self.end_epoch], [self.start_size, self.end_size])
        return int(np.round(size / self.step)) * self.step


def train_size(epoch: int, image_size: int, schedule: ResolutionSchedule | None) -> int:
    """The training crop size of ``epoch``: the schedule's, or ``image_size`` without one."""
    return image_size if schedule is None else schedule.size(epoch)
