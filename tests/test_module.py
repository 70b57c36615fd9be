"""Learning-rate schedule, weight-decay groups and lr scaling."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from trainer.recipe.models import build_model
from trainer.module import Classifier, param_groups, warmup_cosine
from trainer.recipe.specs import OptimSpec, ScheduleSpec


def test_warmup_reaches_peak_at_its_last_step_and_cosine_ends_at_zero():
    warm, total = 10, 110
    assert warmup_cosine(0, warmup_steps=warm, total_steps=total) == pytest.approx(0.1)
    assert warmup_cosine(warm - 1, warmup_steps=warm, total_steps=total) == pytest.approx(1.0)
    assert warmup_cosine(warm, warmup_steps=warm, total_steps=total) == pytest.approx(1.0)
    assert warmup_cosine(60, warmup_steps=warm, total_steps=total) == pytest.approx(0.5)
    assert warmup_cosine(total - 1, warmup_steps=warm, total_steps=total) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert warmup_cosine(total, warmup_steps=warm, total_steps=total) == pytest.approx(0.0)
    values = [warmup_cosine(s, warmup_steps=warm, total_steps=total) for s in range(total)]
    assert values[:warm] == sorted(values[:warm]) and values[warm:] == sorted(values[warm:], reverse=True)


def test_no_weight_decay_on_batchnorm_or_biases():
    model = build_model("resnet18", num_classes=10)
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "fc.bias" in no_decay_names and "bn1.weight" in no_decay_names and "layer1.0.bn2.bias" in no_decay_names
    assert "fc.weight" in decay_names and "conv1.weight" in decay_names
    assert not any(".bn" in n or n.startswith("bn") or n.endswith("bias") for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


class _Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.randn(3, 32, 32), torch.tensor(i % 4)


def test_schedule_in_a_real_fit_peaks_after_warmup_and_ends_near_zero(tmp_path):
    """lr = optim.lr x global batch / 256, warmup 1 epoch, cosine to 0, stepped every iteration."""
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.512, momentum=0.9, weight_decay=1e-4), schedule=ScheduleSpec(warmup_epochs=1))
    loader = torch.utils.data.DataLoader(_Batches(), batch_size=8)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
                         callbacks=[Record()])
    trainer.fit(module, loader)
    peak = 0.512 * 8 / 256
    steps = 5  # 40 images / batch 8
    assert len(seen) == 3 * steps
    assert seen[0] == pytest.approx(peak / steps)
    assert seen[steps - 1] == pytest.approx(peak)  # end of warmup
    assert seen[-1] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 9 / 10)))  # last step of 10 cosine ones
    assert max(seen) == pytest.approx(peak)
