"""The private attributes of Lightning, W&B's Lightning logger and DALI that this project relies on,
each checked against the installed version, so that an upgrade that renames one fails here, loudly,
instead of silently changing behaviour in a long run. setup.py bounds pytorch-lightning to the minor
versions these pass on (2.6)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl


def test_lightning_per_step_sigterm_broadcast_is_where_preemption_replaces_it():
    """trainer/cluster/preemption.py replaces ``_TrainingEpochLoop._broadcast_sigterm_tensor`` (a GPU
    broadcast read back every DDP step) with its own step-boundary agreement."""
    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None))


def test_lightning_batch_progress_counts_processed_batches():
    """data_pipelines/datamodule.py saves ``fit_loop.epoch_loop.batch_progress.current.processed``
    as the data position (batches whose step ran)."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    assert current.processed == 0 and hasattr(current, "completed")


def test_lightning_mixed_precision_refuses_clipping_by_this_flag():
    """trainer/module.py chooses foreach SGD when clipping under mixed precision because Lightning
    refuses to clip for an optimizer with ``_step_supports_amp_scaling`` (fused SGD sets it)."""
    import torch
    from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling

    fused = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, fused=True)
    foreach = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1, foreach=True)
    assert _optimizer_handles_unscaling(fused) and not _optimizer_handles_unscaling(foreach)


def test_wandb_logger_keeps_its_init_arguments_in_wandb_init():
    """trainer/tracking.py changes the mode in ``WandbLogger._wandb_init`` to fall back from online
    to offline to disabled."""
    pytest.importorskip("wandb")
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(mode="disabled", project="p")
    assert logger._wandb_init["mode"] == "disabled" and logger._wandb_init["project"] == "p"  # noqa: SLF001


def test_dali_pipeline_shutdown_and_graph_definition():
    """data_pipelines/dali.py frees a pipeline with ``Pipeline._shutdown`` (idempotent) while its
    iterator still refers to it; tests/test_gpu_construction.py defines GPU graphs on the CPU with
    ``_build_graph`` and reads ``_ops``."""
    from data_pipelines.dali import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.random.coin_flip(probability=0.5)

    p = pipe()
    p._build_graph()  # noqa: SLF001
    assert [op.name for op in p._ops]  # noqa: SLF001
    p.build()
    p._shutdown()  # noqa: SLF001
    p._shutdown()  # noqa: SLF001 - a second call does nothing


def test_torch_storage_use_count_counts_every_tensor_on_the_memory():
    """data_pipelines/buffers.py reuses a batch's memory only when ``torch._C._storage_Use_Count``
    says no other tensor refers to it; a view or an alias must count."""
    import torch

    from data_pipelines.buffers import _others_hold

    buffer = torch.empty(8)
    assert not _others_hold(buffer)
    alias = buffer.detach()
    assert _others_hold(buffer)
    del alias
    view = buffer[2:4]
    assert _others_hold(buffer)
    del view
    assert not _others_hold(buffer)


def test_lightning_logs_with_batches_that_stepped_and_adds_one_on_a_mid_epoch_restore():
    """trainer/cluster/preemption.py's ``align_log_step`` corrects ``_batches_that_stepped`` (the loggers'
    step), which Lightning's epoch loop bumps by one on restoring a mid-epoch checkpoint."""
    import inspect

    from pytorch_lightning.loops.training_epoch_loop import _TrainingEpochLoop

    assert "self._batches_that_stepped += 1" in inspect.getsource(_TrainingEpochLoop.reset)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 0
