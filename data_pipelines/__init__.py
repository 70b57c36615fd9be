"""Data pipelines for imagenet-trainer: tree layout, DALI, torchvision, synthetic data."""

# ImageNet's per-channel mean and std (RGB, of pixel values in [0, 1]): every backend normalises
# with these, and exported models record them as their preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
