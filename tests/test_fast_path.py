"""The GPU fast path's plumbing, checked on the CPU: SGD implementation, channels_last input, no
host synchronisation inside a training step, and the two GPU benchmarks running end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.recipe.models import build_model
from trainer.module import Classifier, sgd_implementation
from trainer.recipe.specs import OptimSpec

REPO = Path(__file__).resolve().parent.parent

# aten ops that make the host wait for the GPU: reading a value back (.item(), float(), bool(),
# `if tensor:`) or computing a data-dependent size.
HOST_SYNC_OPS = ("_local_scalar_dense", "unique", "nonzero", "masked_select", "is_nonzero", "bincount",
                 "equal", "repeat_interleave")


def test_sgd_is_fused_when_every_parameter_is_on_cuda_and_foreach_otherwise():
    cuda = SimpleNamespace(device=torch.device("cuda", 0))
    cpu = torch.zeros(1)
    assert sgd_implementation([cuda, cuda]) == {"fused": True}
    assert sgd_implementation([cpu]) == {"foreach": True}
    assert sgd_implementation([cuda, cpu]) == {"foreach": True}
    assert sgd_implementation(iter([cuda])) == {"fused": True}  # a generator, as model.parameters()
    assert sgd_implementation([]) == {"foreach": True}


def test_input_dtype_follows_the_precision():
    from trainer.run import input_dtype

    assert input_dtype("bf16-mixed") == input_dtype("bf16-true") == "bfloat16"
    assert input_dtype("16-mixed") == "float16"
    assert input_dtype("32-true") == input_dtype("32") == input_dtype("64-true") == "float32"


def test_channels_last_weights_and_inputs():
    model = build_model("resnet18", 4, channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    module = Classifier(model, num_classes=4, batch_size=2, optim=OptimSpec(lr=0.1, momentum=0.9), channels_last=True)
    seen = []
    model.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    images = torch.randn(2, 3, 32, 32)
    assert not images.is_contiguous(memory_format=torch.channels_last)
    module(images)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _HostSyncWatch:
    """What runs between ``start()`` and ``stop()``: every aten op, and every python number that
    ``torch.tensor(..., device=...)`` is asked to put on a device (on a GPU, a blocking copy)."""

    def __init__(self, monkeypatch) -> None:
        self.monkeypatch = monkeypatch
        self.recorder = _OpRecorder()
        self.to_device: list = []
        self._real_tensor = torch.tensor

    def _tensor(self, data, *args, **kwargs):
        if isinstance(data, (int, float, bool)) and "device" in kwargs:
            self.to_device.append(data)
        return self._real_tensor(data, *args, **kwargs)

    def steps(self, batch_idx: int) -> None:
        """Called at the end of every batch: watches batches 2 to 5 (0-based), between log steps."""
        if batch_idx == 1:
            self.monkeypatch.setattr(torch, "tensor", self._tensor)
            self.recorder.__enter__()
        elif batch_idx == 5:
            self.recorder.__exit__(None, None, None)
            self.monkeypatch.setattr(torch, "tensor", self._real_tensor)

    def assert_no_sync(self, conv_op: str, steps: str) -> None:
        assert any(conv_op in op for op in self.recorder.ops)  # the recorder saw the steps
        syncing = sorted({op for op in self.recorder.ops if any(s in op for s in HOST_SYNC_OPS)})
        assert not syncing, f"host syncs inside {steps} steps: {syncing}"
        assert not self.to_device, f"python numbers copied to the device every step: {self.to_device}"


def test_training_steps_make_no_host_sync(tmp_path, monkeypatch):
    """Whole loop iterations of our fit (trainer.run's Classifier, Trainer and callbacks), from the
    end of step 2 to the end of step 6, between two log steps: no op that reads a value back, and
    no python number turned into a tensor on the module's device (on a GPU, a blocking copy).
    tests/test_gpu.py checks the same on CUDA with torch.cuda.set_sync_debug_mode."""
    import pytorch_lightning as pl

    from trainer.config import load_config
    from trainer.run import build_datamodule, build_module, build_trainer

    cfg = load_config([
        "data.backend=synthetic", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
        "data.synthetic_size=40", "data.num_workers=0", "model.arch=resnet20", "model.num_classes=10",
        "trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=50", "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}",
    ])
    watch = _HostSyncWatch(monkeypatch)

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            watch.steps(batch_idx)

    dm = build_datamodule(cfg)
    trainer = build_trainer(cfg, tmp_path / "run", for_fit=True)
    trainer.callbacks.append(Watch())
    trainer.fit(build_module(cfg, dm.classes), datamodule=dm)
    assert trainer.global_step == 10
    watch.assert_no_sync("convolution", "training")


def test_validation_steps_make_no_host_sync(tmp_path, monkeypatch):
    """Validation steps 2-5 of our validate (trainer.run's Classifier and Trainer): no op that reads a
    value back and no python number copied to the device. Before, each step copied its image count
    to the device (torch.tensor(float(n), device=...)) and SumMetric's NaN check read a value back."""
    import pytorch_lightning as pl

    from trainer.config import load_config
    from trainer.run import build_datamodule, build_module, build_trainer

    cfg = load_config([
        "data.backend=synthetic", "data.batch_size=4", "data.image_size=32", "data.val_resize=32",
        "data.num_workers=0", "model.arch=resnet20", "model.num_classes=10", "trainer.accelerator=cpu",
        "trainer.limit_val_batches=7", "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}",
    ])
    watch = _HostSyncWatch(monkeypatch)

    class Watch(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            watch.steps(batch_idx)

    dm = build_datamodule(cfg)
    trainer = build_trainer(cfg, tmp_path / "run", for_fit=False)
    trainer.callbacks.append(Watch())
    (metrics,) = trainer.validate(build_module(cfg, dm.classes), datamodule=dm, verbose=False)
    assert metrics["val/images"] == 7 * 4
    watch.assert_no_sync("conv", "validation")  # conv2d: not decomposed under inference_mode


def test_progress_bar_shows_the_loss_it_no_longer_gets_from_prog_bar(tmp_path):
    import pytorch_lightning as pl

    from data_pipelines.synthetic import SyntheticLoader
    from trainer.callbacks import ProgressBar

    bar = ProgressBar(refresh_rate=1)
    module = Classifier(build_model("resnet20", 4), num_classes=4, batch_size=4, optim=OptimSpec(lr=0.1, momentum=0.9))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         callbacks=[bar], default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(module, SyntheticLoader(num_batches=2, batch_size=4, image_size=32, num_classes=4, seed=0))
    assert "train/loss_step" not in trainer.progress_bar_metrics  # no per-step read-back
    assert float(bar.get_metrics(trainer, module)["loss"]) > 0


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_loop_overhead_runs_on_the_cpu_and_prints_its_table(tmp_path):
    proc = _run("loop_overhead.py", "--arch", "resnet20", "--batch", "4", "--image-size", "32", "--steps", "2",
                "--warmup", "1", "--rounds", "1", "--threads", "1", "--out", str(tmp_path / "lo"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for loop in ("plain", "plain+metrics", "lightning"):
        assert f"| {loop} |" in proc.stdout
    assert "Lightning / plain = " in proc.stdout
    rows = json.loads((tmp_path / "lo.json").read_text())["rows"]
    assert [r["loop"] for r in rows] == ["plain", "plain+metrics", "lightning"]
    assert rows[0]["ratio"] == 1.0 and all(r["ms_per_step"] > 0 for r in rows)


@pytest.mark.slow
def test_gpu_throughput_runs_on_the_cpu_with_tiny_sizes(tmp_path):
    proc = _run("gpu_throughput.py", "--device", "cpu", "--arch", "resnet20", "--batch", "4", "--steps", "2",
                "--repeats", "2", "--warmup", "1", "--image-size", "32", "--threads", "1",
                "--rows", "dali-alone,synthetic,dali,lightning", "--out", str(tmp_path / "gt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| row | model | data |" in proc.stdout
    result = json.loads((tmp_path / "gt.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["synthetic"]["images_per_sec"] > 0 and rows["synthetic"]["phases_ms"]["forward"] > 0
    assert rows["lightning"]["images_per_sec"] > 0
    from data_pipelines.dali import dali_available

    if dali_available():
        assert rows["dali"]["images_per_sec"] > 0 and rows["dali-alone"]["images_per_sec"] > 0
    else:
        assert rows["dali"]["note"].startswith("skipped: DALI")
