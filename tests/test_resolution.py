"""Image sizes: progressive resizing (FFCV's rule) on every backend, also across a mid-ramp resume;
a validation crop separate from the training crop; test-time flip augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data_pipelines.resolution import ResolutionSchedule
from trainer.config import ConfigError, load_config
from trainer.recipe.models import build_model
from trainer.module import Classifier
from trainer.recipe.specs import OptimSpec
from tests.conftest import CPU_FIT, Interrupt, fit_until_interrupted, run_cli, skip_without_dali


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """ffcv-imagenet's train_imagenet.py ``get_resolution``, as published."""
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize("start,end,first,last", [(160, 192, 65, 76), (160, 192, 11, 13), (128, 224, 2, 30),
                                                  (32, 96, 0, 2), (100, 250, 5, 5)])
def test_schedule_is_ffcvs_get_resolution(start, end, first, last):
    schedule = ResolutionSchedule(start_size=start, end_size=end, start_epoch=first, end_epoch=last)
    for epoch in range(last + 5):
        assert schedule.size(epoch) == ffcv_get_resolution(epoch, start, end, last, first), epoch
        if first < epoch < last:
            assert schedule.size(epoch) % 32 == 0


def test_a_smaller_step_keeps_a_small_ramp_between_its_ends():
    """At 32 px steps a 40 -> 48 ramp would drop to 32 mid-ramp; a proxy at a quarter of ImageNet's
    size scales the step with it (data.progressive.step)."""
    coarse = ResolutionSchedule(start_size=40, end_size=48, start_epoch=6, end_epoch=8)
    fine = ResolutionSchedule(start_size=40, end_size=48, start_epoch=6, end_epoch=8, step=8)
    assert coarse.size(7) == 32
    assert [fine.size(e) for e in range(5, 10)] == [40, 40, 48, 48, 48]
    with pytest.raises(ValueError, match="step=0"):
        ResolutionSchedule(start_size=40, end_size=48, start_epoch=6, end_epoch=8, step=0)


# -- config -----------------------------------------------------------------------------------

RAMP = ["data.progressive.start_size=32", "data.progressive.end_size=96", "data.progressive.start_epoch=0",
        "data.progressive.end_epoch=2"]


def test_size_keys_compose_and_validate():
    cfg = load_config(["data.root=/x", "data.val_image_size=200", "data.val_resize=232", *RAMP])
    assert cfg.data.val_image_size == 200 and cfg.data.image_size == 224
    assert dict(cfg.data.progressive) == {"start_size": 32, "end_size": 96, "start_epoch": 0, "end_epoch": 2,
                                          "step": 32}
    default = load_config(["data.root=/x"])
    assert default.data.val_image_size is None and default.data.progressive.start_size is None
    assert default.eval.tta_flip is False
    assert load_config(["data.root=/x", "eval.tta_flip=true"]).eval.tta_flip is True
    # The resize before the crop may be smaller than the training crop, not than the validation crop.
    load_config(["data.root=/x", "data.image_size=288", "data.val_image_size=224", "data.val_resize=256"])


@pytest.mark.parametrize("overrides,key", [
    (["data.val_image_size=300"], "data.val_image_size"),  # larger than data.val_resize=256
    (["data.val_image_size=0"], "data.val_image_size"),
    (["data.image_size=300"], "data.image_size"),
    (["data.progressive.start_size=64"], "data.progressive.end_size"),
    ([*RAMP[:3], "data.progressive.end_epoch=-1"], "data.progressive.start_epoch"),
    (["data.progressive.start_size=128", *RAMP[1:]], "data.progressive.start_size"),
    (["data.progressive.start_size=0", *RAMP[1:]], "data.progressive.start_size"),
    (["eval.tta_flip=maybe"], "eval.tta_flip"),
])
def test_bad_size_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(["data.root=/x", *overrides])


@pytest.mark.slow
def test_a_bad_size_exits_2_at_start(tiny_root, tmp_path):
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={tmp_path}/run", "data.val_image_size=64",
                   timeout=120)
    assert proc.returncode == 2 and "data.val_image_size=64" in proc.stderr, proc.stderr[-2000:]


# -- every backend: the scheduled size in each epoch, also after a mid-ramp resume -----------------

SCHEDULE = ResolutionSchedule(start_size=16, end_size=64, start_epoch=0, end_epoch=2)  # 16, 32 (40 rounded), 64
VAL_SIZE = 24


class Sizes(pl.Callback):
    """The image size of every training batch (epoch, batch, size) and of every validation batch;
    with ``stop_at``, a checkpoint at that batch's start (as on SLURM's USR1), then a stop."""

    def __init__(self, stop_at=None, ckpt=None):
        self.train, self.val, self.stop_at, self.ckpt = [], set(), stop_at, ckpt

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.stop_at:
            trainer.save_checkpoint(self.ckpt)
            raise Interrupt
        assert batch[0].shape[-1] == batch[0].shape[-2]
        self.train.append((trainer.current_epoch, batch_idx, batch[0].shape[-1]))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val.add(tuple(batch[0].shape[-2:]))


def _fit(root, tmp_path, backend, record, ckpt_path=None):
    return fit_until_interrupted(tmp_path, record, num_classes=4, ckpt_path=ckpt_path, limit_val_batches=1,
                                 root=str(root), backend=backend, batch_size=16, image_size=40, val_resize=28,
                                 val_image_size=VAL_SIZE, synthetic_size=64, resolution=SCHEDULE)


@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu", "synthetic"])
@pytest.mark.slow
def test_progressive_resizing_gives_each_epoch_its_size_also_after_a_mid_ramp_resume(tiny_root, tmp_path, backend):
    """64 images, batch 16: 4 steps per epoch; sizes 16, 32, 64. The torchvision backend runs one
    persistent worker process, which must learn each epoch's size too. The run is interrupted
    in the ramp's middle epoch and resumed from its checkpoint."""
    if backend.startswith("dali"):
        skip_without_dali()
    full = Sizes()
    _fit(tiny_root, tmp_path / "full", backend, full)
    want = [(epoch, batch, SCHEDULE.size(epoch)) for epoch in range(3) for batch in range(4)]
    assert full.train == want
    assert [SCHEDULE.size(e) for e in range(3)] == [16, 32, 64]
    assert full.val == {(VAL_SIZE, VAL_SIZE)}  # the validation crop, whatever the training size

    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    first = Sizes(stop_at=(1, 2), ckpt=ckpt)
    _fit(tiny_root, tmp_path / "a", backend, first)
    second = Sizes()
    trainer = _fit(tiny_root, tmp_path / "b", backend, second, ckpt_path=str(ckpt))
    assert first.train + second.train == want
    assert second.train[0] == (1, 2, 32)  # resumed mid-ramp, at the ramp's size for that epoch
    assert trainer.global_step == 12


# -- test-time augmentation ----------------------------------------------------------------------

@pytest.mark.parametrize("tta_flip", [False, True])
def test_tta_flip_validates_on_the_mean_of_the_logits_of_image_and_mirror(tta_flip):
    torch.manual_seed(0)
    module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=4, optim=OptimSpec(lr=0.1, momentum=0.9),
                        tta_flip=tta_flip).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seen = []
    module.val_top1.update = lambda logits, target: seen.append(logits)
    module.log = lambda *args, **kwargs: None
    with torch.no_grad():
        module.validation_step((images, labels), 0)
        plain, mirrored = module.logits(images), module.logits(images.flip(-1))
    assert not torch.allclose(plain, mirrored)  # the images are not symmetric: TTA changes something
    want = (plain + mirrored) / 2 if tta_flip else plain
    torch.testing.assert_close(seen[0], want)
