"""NVIDIA DALI input pipelines (GPU or CPU) and the loader Lightning iterates.

Sample order is ours, not DALI's: every epoch the loader asks its source
(:mod:`data_pipelines.sources`: the rules of :mod:`data_pipelines.sharding` for a folder tree,
:mod:`data_pipelines.shards` for a pack) for the ids this rank feeds and builds a DALI pipeline
whose reader reads exactly that list, in that order (``random_shuffle=False``, one shard): DALI's
file reader for a tree, its webdataset reader for a pack. Rebuilding costs about 0.2 s for a
160k-file shard (ImageNet on 8 GPUs; 2.9 s for all 1.28M files on one), against minutes for the
epoch. This gives exact sharding, the same number of steps on every rank, the same sample sequence
as the torchvision backend, and a resumable position (resuming mid-epoch builds the pipeline from
``start_step``).

Bad images: DALI cannot skip a sample. A file it cannot read or decode (truncated, empty, not an
image) is a *critical* pipeline error: the pipeline becomes unusable and the loader raises a
``RuntimeError`` naming the file, so the job stops instead of hanging or silently training on
less data. When DALI's error does not name the file (:mod:`.errors`), the source decodes, with
Pillow and nvImageCodec, the few batches that were in flight when the error came and names the
culprits it finds (``Source.dali_failure``). The message always says how to find every bad image
at once: ``imagenet-trainer check-data ROOT``. (Under ``srun``, add ``--kill-on-bad-exit=1`` so
that the other ranks stop too rather than wait in a collective until the NCCL timeout.)

The modules: :mod:`.graphs` (the pipeline definitions, and DALI's import), :mod:`.loader`
(:class:`DALILoader`, :class:`PipelineOptions`: the epoch's ids, the position, the iteration),
:mod:`.transfer` (DALI's outputs to the model's batch: torch tensors, resize of CPU crops,
normalisation on the training device), :mod:`.errors` (reading DALI's errors).
"""
from .graphs import dali_available, dali_import_error_message, pipeline_seed, require_dali, train_pipeline, val_pipeline
from .loader import DALILoader, PipelineOptions
from .transfer import model_batch, resize_and_flip

__all__ = [
    "DALILoader", "PipelineOptions", "dali_available", "dali_import_error_message", "model_batch", "pipeline_seed",
    "require_dali", "resize_and_flip", "train_pipeline", "val_pipeline",
]
