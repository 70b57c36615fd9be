"""imagenet-trainer: distributed ImageNet training of ResNets and their plain twins."""

__version__ = "0.1.0"
