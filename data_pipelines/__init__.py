"""Data pipelines for imagenet-trainer: tree layout, DALI, torchvision, synthetic data."""
