"""Every recipe in conf/experiment/ trains: 2 steps and a validation on the CPU with tiny data.

Each recipe keeps what makes it itself (optimiser, schedule, loss, EMA, augmentation, BlurPool,
test-time flip, progressive resizing, repeated augmentation); only what a CPU and 4 tiny classes
cannot take is shrunk: the device, precision, batch, image sizes and the number of steps.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from trainer.config import experiments, load_config
from trainer.run import fit

SMALL = [
    "data.backend=dali_cpu", "data.num_workers=1", "data.batch_size=4", "trainer.accelerator=cpu",
    "trainer.devices=1", "trainer.num_nodes=1", "trainer.precision=32-true", "trainer.max_epochs=1",
    "trainer.limit_train_batches=2", "trainer.limit_val_batches=2", "model.channels_last=false",
    "model.num_classes=null", "logger.wandb.mode=disabled",
]


def _small_sizes(cfg) -> list[str]:
    """Crops of 32 px (progressive ramps from 32 to 64, in one 32 px step), validation 32 of 36."""
    out = ["data.image_size=32", "data.val_resize=36"]
    if OmegaConf.select(cfg, "data.val_image_size") is not None:
        out.append("data.val_image_size=32")
    if OmegaConf.select(cfg, "data.progressive.start_size") is not None:
        out += ["data.image_size=64", "data.progressive.start_size=32", "data.progressive.end_size=64",
                "data.val_resize=72", "data.val_image_size=64"]
    return out


@pytest.mark.parametrize("recipe", experiments())
def test_every_recipe_trains_two_steps_on_the_cpu(recipe, tiny_root, tmp_path):
    base = load_config([f"experiment={recipe}", f"data.root={tiny_root}"])
    extra = []
    if recipe in ("finetune", "linear_probe"):  # needs weights to start from: a torchvision ResNet-18's, saved as users do
        import torchvision

        weights = tmp_path / "resnet18.pt"
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
        extra = ["model.arch=resnet18", f"model.init_from={weights}"]
    cfg = load_config([f"experiment={recipe}", f"data.root={tiny_root}", *SMALL, *_small_sizes(base), *extra,
                       f"run.dir={tmp_path / 'run'}"])
    summary = fit(cfg)
    assert summary["global_step"] == 2, summary
    assert summary["val/images"] > 0 and 0 <= summary["val/top1"] <= 1
    if cfg.ema.decay is not None:
        assert "val_ema/top1" in summary, sorted(summary)
