"""The training loss, built by name (``loss.name``).

Both losses take either class indices ``[N]`` or soft targets ``[N, C]`` (probabilities, e.g.
from MixUp/CutMix), and apply ``label_smoothing`` to either the same way:
``target * (1 - s) + s / C``. So whatever mixes labels should hand over unsmoothed targets.
"""
from __future__ import annotations

import torch
from torch import nn


class CrossEntropy(nn.CrossEntropyLoss):
    """Softmax cross-entropy; soft targets are cast to the logits' dtype (torch requires one dtype)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.is_floating_point():
            target = target.to(logits.dtype)
        return super().forward(logits, target)


class BinaryCrossEntropy(nn.Module):
    """One sigmoid per class (ResNet Strikes Back, Composer): ``BCEWithLogits`` on one-hot targets,
    summed over the classes and averaged over the batch, so its scale per image is that of
    cross-entropy and an SGD lr tuned for ``ce`` stays in range.

    timm's ``BinaryCrossEntropy`` does the work; it smooths index targets as above but expects soft
    targets smoothed already, so they are smoothed here first.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        from timm.loss import BinaryCrossEntropy as TimmBCE

        self.label_smoothing = label_smoothing
        self.bce = TimmBCE(smoothing=label_smoothing, sum_classes=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape == logits.shape:
            target = target.to(logits.dtype)
            if self.label_smoothing:
                target = target * (1.0 - self.label_smoothing) + self.label_smoothing / logits.shape[-1]
        return self.bce(logits, target)


# name -> the loss' class, built as ``cls(label_smoothing)``. A new loss is one entry here (its
# state_dict must stay empty: checkpoints hold none); validation reads the names from here.
LOSSES: dict[str, type[nn.Module]] = {"ce": CrossEntropy, "bce": BinaryCrossEntropy}


def build_loss(name: str, label_smoothing: float = 0.0) -> nn.Module:
    """The loss called ``name`` (see ``LOSSES``): ``loss(logits, target)``, a scalar mean over the batch."""
    if name not in LOSSES:
        raise ValueError(f"loss.name={name!r} is unknown; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name](label_smoothing=label_smoothing)
