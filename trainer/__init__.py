"""imagenet-trainer: distributed ImageNet training of ResNets and their plain twins."""

__version__ = "0.1.0"
__all__ = ["load_pretrained"]


def __getattr__(name: str):
    # Lazy: `import trainer` (the CLI, every test) must not pay for torchvision or onnxruntime.
    if name == "load_pretrained":
        from trainer.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
