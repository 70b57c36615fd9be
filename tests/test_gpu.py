"""On a CUDA GPU: the DALI GPU pipeline against the CPU one, bf16 / fp16 fits, no host sync in a step.

Run with ``pytest -m gpu`` on a machine with a GPU (bench/gpu_check.sh does);
everywhere else every test here is skipped, with the reason.
"""
from __future__ import annotations

import csv
import json
import time
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def _dali():
    from data_pipelines import dali

    if not dali.dali_available():
        pytest.skip(dali.dali_import_error_message())
    return dali


def _split(root: Path, split: str):
    from data_pipelines import layout

    return layout.scan_dataset(root)[0 if split == "train" else 1]


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    try:
        return [(images.float().cpu(), labels.cpu()) for images, labels in loader]
    finally:
        loader.release()


def test_dali_gpu_validation_batches_equal_dali_cpu(tiny_root):
    """Same files, same order, same labels; pixels within decoding tolerance. nvJPEG and
    libjpeg-turbo round and upsample chroma differently, so pixels differ by a few levels, and
    more on sharp colour edges: a small mean difference, and few large ones."""
    dali = _dali()
    val = _split(tiny_root, "val")
    kwargs = dict(image_size=32, val_resize=36, num_threads=2)
    gpu = dali.DALILoader(val.files, val.labels, train=False, batch_size=8,
                          options=dali.PipelineOptions(device="gpu", device_id=0, **kwargs))
    cpu = dali.DALILoader(val.files, val.labels, train=False, batch_size=8,
                          options=dali.PipelineOptions(device="cpu", **kwargs))
    first = next(iter(gpu))
    assert first[0].is_cuda and first[1].is_cuda and first[1].dtype == torch.int64
    gpu.release()
    got, want = _batches(gpu), _batches(cpu)
    assert [b[0].shape for b in got] == [b[0].shape for b in want]
    assert torch.equal(torch.cat([b[1] for b in got]), torch.cat([b[1] for b in want]))
    diff = (torch.cat([b[0] for b in got]) - torch.cat([b[0] for b in want])).abs()
    one_level = 1 / 255 / 0.225  # one 8-bit level, in normalised units
    stats = f"mean {diff.mean() / one_level:.2f} levels, max {diff.max() / one_level:.1f} levels"
    assert diff.mean() < 3 * one_level, stats
    assert (diff > 16 * one_level).float().mean() < 0.02, stats


def test_dali_gpu_reads_a_pack_as_it_reads_the_same_files(tiny_root, tiny_pack):
    """dali_gpu from tar shards (webdataset reader, mixed decoder): the validation batches equal
    those from the same files bit for bit, labels parsed from ``.cls`` on the GPU, and a training
    epoch yields full batches of the pack's labels."""
    dali = _dali()
    from data_pipelines import shards
    from data_pipelines.sources import PackSource

    manifest = shards.read_manifest(tiny_pack)
    val = _split(tiny_root, "val")
    options = dali.PipelineOptions(image_size=32, val_resize=36, num_threads=2, device="gpu", device_id=0)
    got = _batches(dali.DALILoader(PackSource(manifest.val), train=False, batch_size=8, options=options))
    want = _batches(dali.DALILoader(val.files, val.labels, train=False, batch_size=8, options=options))
    assert len(got) == len(want)
    for (xa, ya), (xb, yb) in zip(got, want):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    loader = dali.DALILoader(PackSource(manifest.train), train=True, batch_size=8, options=options)
    batches = _batches(loader)
    assert len(batches) == len(manifest.train) // 8 and all(x.shape == (8, 3, 32, 32) for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(len(manifest.classes)))


def test_dali_cpu_batches_are_normalised_on_the_gpu_they_are_sent_to(tiny_root):
    """dali_cpu on a GPU run: uint8 pixels cross to the GPU and are normalised there, to the same
    values the CPU computes."""
    dali = _dali()
    val = _split(tiny_root, "val")
    kwargs = dict(image_size=32, val_resize=36, num_threads=2, device="cpu")
    on_gpu = dali.DALILoader(val.files, val.labels, train=False, batch_size=8,
                             options=dali.PipelineOptions(output_device="cuda:0", **kwargs))
    images, labels = next(iter(on_gpu))
    assert images.is_cuda and images.dtype == torch.float32 and labels.is_cuda and labels.dtype == torch.int64
    on_gpu.release()
    here = dali.DALILoader(val.files, val.labels, train=False, batch_size=8, options=dali.PipelineOptions(**kwargs))
    got, want = _batches(on_gpu), _batches(here)
    torch.testing.assert_close(torch.cat([b[0] for b in got]), torch.cat([b[0] for b in want]), rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([b[1] for b in got]), torch.cat([b[1] for b in want]))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dali_gpu_training_batches_are_normalised_on_the_device(tiny_root, dtype, channels_last):
    dali = _dali()
    train = _split(tiny_root, "train")
    options = dali.PipelineOptions(image_size=32, device="gpu", device_id=0, num_threads=2, dtype=dtype,
                                   channels_last=channels_last)
    loader = dali.DALILoader(train.files, train.labels, train=True, batch_size=8, options=options)
    try:
        images, labels = next(iter(loader))
        assert images.is_cuda and images.dtype == getattr(torch, dtype) and images.shape == (8, 3, 32, 32)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert images.is_contiguous(memory_format=layout)
        assert labels.is_cuda and labels.dtype == torch.int64 and labels.shape == (8,)
        x = images.float()
        assert torch.isfinite(x).all() and -3 < x.mean() < 3 and 0.2 < x.std() < 3
    finally:
        loader.release()


def _metrics_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("backend", ["dali_gpu", "torchvision"])
@pytest.mark.slow
def test_bf16_fit_on_the_gpu_learns_and_validates_every_image_once(sample_root, tmp_path, backend):
    from tests.conftest import run_cli

    if backend == "dali_gpu":
        _dali()
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "experiment=smoke", f"data.root={sample_root}", f"run.dir={run_dir}",
                   f"data.backend={backend}", "data.num_workers=2", "data.batch_size=32", "trainer.accelerator=gpu",
                   "trainer.devices=1", "trainer.precision=bf16-mixed", "model.channels_last=true",
                   "trainer.max_epochs=3", "optim.lr=0.4", "optim.warmup_epochs=1", "logger.wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val/images"] == 300  # 10 classes x 30: each image once, none padded
    assert summary["global_step"] == 3 * (1200 // 32)
    epoch_losses = [float(r["train/loss_epoch"]) for r in _metrics_csv(run_dir) if r.get("train/loss_epoch")]
    assert len(epoch_losses) == 3 and epoch_losses[-1] < epoch_losses[0], epoch_losses


class _DeviceBatches:
    def __init__(self, n: int, batch: int = 16, size: int = 32, classes: int = 10) -> None:
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, size, size, generator=gen).cuda()
        self.labels = torch.randint(0, classes, (batch,), generator=gen).cuda()
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.images, self.labels


def _fit(tmp_path: Path, precision: str, extra: list[str] = (), callbacks=(), loader=None, datamodule=False,
         cudnn_benchmark_before: bool | None = None):
    """Our fit (trainer.run's module, trainer and callbacks) on the GPU; returns the trainer.
    ``cudnn_benchmark_before``: the global cuDNN flag is set to this first (an earlier test may have
    switched it on)."""
    if cudnn_benchmark_before is not None:
        torch.backends.cudnn.benchmark = cudnn_benchmark_before
    from trainer.config import load_config
    from trainer.run import build_datamodule, build_module, build_trainer

    overrides = ["data.backend=synthetic", "data.batch_size=16", "data.image_size=32", "data.val_resize=32",
                 "data.synthetic_size=160", "data.num_workers=2", "model.arch=resnet20", "model.num_classes=10",
                 "model.channels_last=true", f"trainer.precision={precision}", "trainer.accelerator=gpu",
                 "trainer.devices=1", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
                 "trainer.log_every_n_steps=50", "logger.wandb.mode=disabled", f"run.dir={tmp_path / 'run'}", *extra]
    cfg = load_config(overrides)
    dm = build_datamodule(cfg) if datamodule else None
    classes = dm.classes if dm is not None else [f"class{i}" for i in range(10)]
    module = build_module(cfg, classes)
    trainer = build_trainer(cfg, tmp_path / "run", for_fit=True)
    trainer.callbacks.extend(callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dm is not None:
            trainer.fit(module, datamodule=dm)
        else:
            trainer.fit(module, train_dataloaders=loader or _DeviceBatches(10))
    return trainer


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fit_uses_fused_sgd_and_the_loss_falls(tmp_path, precision):
    import pytorch_lightning as pl

    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = _fit(tmp_path, precision, ["optim.lr=0.8", "optim.warmup_epochs=0", "optim.label_smoothing=0"],
                   callbacks=[Losses()], loader=_DeviceBatches(30), cudnn_benchmark_before=False)
    assert trainer.optimizers[0].defaults["fused"] is True
    assert torch.backends.cudnn.benchmark  # switched on by our build_trainer: it was off before
    assert all(torch.isfinite(torch.tensor(losses))) and len(losses) == 30
    # One batch, learned by heart: the loss must fall well below its start.
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fit_clips_gradients_under_mixed_precision(tmp_path, precision):
    """Lightning's mixed-precision plugin refuses to clip for fused SGD: clipping takes foreach."""
    trainer = _fit(tmp_path, precision, ["trainer.gradient_clip_val=1.0"], loader=_DeviceBatches(4))
    assert trainer.global_step == 4
    assert trainer.optimizers[0].defaults["foreach"] is True


@pytest.mark.parametrize("data", ["device_batches", "dali_gpu"])
def test_training_steps_make_no_host_sync(tmp_path, data, sample_root, record_property):
    """torch.cuda.set_sync_debug_mode over whole loop iterations (end of step 3 to end of step 9,
    no log step among them): no .item(), no blocking copy, nothing of torch's that waits for the GPU.

    What this cannot see: DALI's own host waits (its C++ executor synchronises its streams without
    going through torch). For dali_gpu the time the loop waited for data is recorded instead
    (``data_wait_frac``, as the Throughput callback logs it as perf/data_wait_frac); the benchmark
    bench/gpu_throughput.py measures the GPU's idle gap per step."""
    import pytorch_lightning as pl

    marks: dict[str, int] = {}
    waits: list[float] = []

    class Watch(pl.Callback):
        """Turns the sync check on and off and marks where the window's warnings start and end;
        the warnings themselves are recorded by a catch_warnings around the whole fit, so that
        it is always exited, whatever happens inside the fit."""

        def __init__(self, records: list) -> None:
            self.records = records
            self.step_end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "start" in marks and "end" not in marks:
                waits.append(time.perf_counter() - self.step_end)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 2:
                marks["start"] = len(self.records)
                warnings.simplefilter("always")  # _fit ignores warnings; its own catch_warnings restores this
                torch.cuda.set_sync_debug_mode("warn")
                self.window_start = time.perf_counter()
            elif batch_idx == 8 and "start" in marks:
                torch.cuda.set_sync_debug_mode("default")
                marks["end"] = len(self.records)
                marks["window_s"] = time.perf_counter() - self.window_start
            self.step_end = time.perf_counter()

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            if data == "dali_gpu":
                _dali()
                _fit(tmp_path, "bf16-mixed", [f"data.root={sample_root}", "data.backend=dali_gpu", "data.num_workers=2",
                                              "trainer.limit_train_batches=12", "model.num_classes=null"],
                     callbacks=[Watch(records)], datamodule=True)
            else:
                _fit(tmp_path, "bf16-mixed", callbacks=[Watch(records)], loader=_DeviceBatches(12))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert "end" in marks, "the fit ended before the watched steps"
    syncs = [f"{Path(w.filename).name}:{w.lineno}" for w in records[marks["start"]:marks["end"]]
             if "synchroniz" in str(w.message)]
    assert not syncs, f"{len(syncs)} host syncs in 6 steps, at: {sorted(set(syncs))}"
    if data == "dali_gpu":
        record_property("data_wait_frac", round(sum(waits) / marks["window_s"], 3))
