"""MixUp and CutMix: the training batch mixed with itself, on the device that trains, for every
data backend.

torchvision's ``transforms.v2.MixUp`` and ``CutMix`` (what its reference recipe runs, there in
the collate function): one mixing weight ``lam ~ Beta(alpha, alpha)`` per batch, each image mixed
with its neighbour in the batch (the batch is shuffled already), labels turned into soft targets
``lam * onehot(y) + (1 - lam) * onehot(y_neighbour)`` of shape [N, num_classes] that the loss
takes as they are. With both on, one of the two per batch, with equal chance. The weights and
boxes are drawn from torch's CPU generator (seeded by the run's seed): no GPU sync. Train top-1
is then measured against each image's dominant label, the argmax of its soft target (the class
with the larger share of the blend): ``Classifier.training_step``.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2


class BatchMixing(nn.Module):
    """``(images [N, C, H, W], labels [N]) -> (mixed images, soft targets [N, num_classes])``.
    No parameters, no buffers: a checkpoint's state_dict is the same with it or without."""

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:
        super().__init__()
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: must be 0 (off) or positive")
        mixers = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixers:
            raise ValueError("BatchMixing needs mixup_alpha or cutmix_alpha > 0")
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(images, labels)


def build_mixing(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> BatchMixing | None:
    """The batch mixing for these settings; None when both are off (0)."""
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return BatchMixing(num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)

