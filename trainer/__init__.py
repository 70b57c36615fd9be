"""imagenet-trainer: distributed ImageNet training of ResNets and their plain twins.

The run itself is at the top (cli.py, config.py, run.py, module.py, callbacks.py, tracking.py,
metrics_csv.py); the rest is in rooms named for what they hold: recipe/ (network, optimiser,
schedule, loss, mixing, EMA), cluster/ (SLURM, preemption), artifacts/ (export, load_pretrained,
predict, fine-tuning, plots, the degradation study). docs/design.md has the map.
"""

__version__ = "0.1.0"
__all__ = ["load_pretrained"]


def __getattr__(name: str):
    # Lazy: `import trainer` (the CLI, every test) must not pay for torchvision or onnxruntime.
    if name == "load_pretrained":
        from trainer.artifacts.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
