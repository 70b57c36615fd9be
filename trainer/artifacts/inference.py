"""A loaded model run over image files: :func:`forward_images`, one row of logits (or of pooled
features) per file, on every backend and across the ranks of a multi-process launch.

What the downstream verbs (``evaluate``, ``features``) have in common: the model's own validation
preprocessing (``Pretrained.meta["preprocessing"]``), the backends' val batches (the torchvision
loader's ``ImageFiles`` over a :class:`sources.FolderSource`; DALI's :class:`DALILoader`, which
makes the same resize and centre crop), and the ranks' contiguous, disjoint slices
(``Source.val_ids``) gathered so that every rank holds every row, each image counted once.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trainer.artifacts.pretrained import Pretrained

OUTPUTS = ("logits", "features")
BACKENDS = ("torchvision", "dali_cpu", "dali_gpu")


@dataclass(frozen=True)
class Ranks:
    """This process's share of the work: rank ``rank`` of ``world`` (1: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def preprocessing(pretrained: Pretrained, resize: int | None = None, crop: int | None = None) -> dict:
    """The model's validation preprocessing with ``resize``/``crop`` overriding it; ``resize=0``:
    no resize at all (images already at their size, as ImageNet-C's 224x224: centre crop only)."""
    prep = dict(pretrained.meta.get("preprocessing") or {})
    missing = [k for k in ("resize", "crop", "mean", "std") if k not in prep]
    if missing:
        raise ValueError(f"the model's metadata has no preprocessing {', '.join(missing)}: export it again "
                         f"with `imagenet-trainer export CKPT`")
    if resize is not None:
        prep["resize"] = int(resize)
    if crop is not None:
        prep["crop"] = int(crop)
    if prep["resize"] < 0 or prep["crop"] < 1:
        raise ValueError(f"resize={prep['resize']} crop={prep['crop']}: resize >= 0 (0: none), crop >= 1")
    return prep


def val_transform(prep: dict):
    """Shorter side to ``prep["resize"]`` (bilinear, antialiased; skipped when 0), centre crop,
    normalise: ``pretrained.preprocess_transform``'s steps."""
    from torchvision import transforms

    steps = [transforms.Resize(int(prep["resize"]))] if int(prep["resize"]) else []
    return transforms.Compose(steps + [
        transforms.CenterCrop(int(prep["crop"])),
        transforms.ToTensor(),
        transforms.Normalize(prep["mean"], prep["std"]),
    ])


def current_ranks() -> Ranks:
    """The ranks of this launch (``data_pipelines.launch.current()``, or an initialised process
    group's), joining the process group (gloo on the CPU, NCCL on GPUs, ``env://``: ``MASTER_ADDR``,
    ``MASTER_PORT``) when the launch has several processes and none is initialised yet."""
    import torch
    import torch.distributed as dist

    from data_pipelines import launch

    here = launch.current()
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), here.local_rank)
    world = here.world_size or 1
    if world <= 1:
        return Ranks(0, 1, here.local_rank)
    if here.global_rank is None:
        raise RuntimeError(f"{here.position.described}: the {here.launcher} launch gives no global rank "
                           f"(set RANK, or start the processes with torchrun or srun)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(here.local_rank)
    dist.init_process_group(backend, init_method="env://", rank=here.global_rank, world_size=world)
    return Ranks(here.global_rank, world, here.local_rank)


def _device(pretrained: Pretrained, ranks: Ranks, backend: str):
    import torch

    from trainer.artifacts.pretrained import OnnxModel

    if isinstance(pretrained.model, OnnxModel):
        if backend == "dali_gpu":
            raise ValueError("an ONNX model runs on the CPU (onnxruntime): use --backend torchvision or dali_cpu")
        return torch.device("cpu")
    if backend == "dali_gpu" or torch.cuda.is_available():
        if not torch.cuda.is_available():
            raise RuntimeError("--backend dali_gpu needs a CUDA GPU, and none is available here: use dali_cpu")
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def _pooled_features(model, output: str):
    """Collects the input of the classifier ``model.fc`` (the pooled features) while ``output`` is
    "features"; yields the list the batches are appended to."""
    captured: list = []
    if output == "logits":
        yield captured
        return
    fc = getattr(model, "fc", None)
    if fc is None:
        raise ValueError(f"output='features' needs a PyTorch network with a classifier `fc` (a ResNet); "
                         f"{type(model).__name__} has none (an ONNX export gives logits only: load the .ckpt "
                         f"or a .pt/.safetensors export)")
    handle = fc.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1)))
    try:
        yield captured
    finally:
        handle.remove()


class _Images:
    """(image tensor, position, error) for the samples ``ids`` of ``source``: an unreadable image
    gives its error, raised by the caller as it is (a worker's exception would come back wrapped
    in its traceback)."""

    def __init__(self, source, ids: Sequence[int], transform, crop: int) -> None:
        self.source, self.ids, self.transform, self.crop = source, ids, transform, crop

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        import torch

        sample = int(self.ids[index])
        try:
            image, _ = self.source.load(sample)
            return self.transform(image), index, ""
        except Exception as err:  # noqa: BLE001 - any failure, reported with the image
            where = self.source.describe(sample)
            message = str(err) if where in str(err) else f"cannot read image {where}: {err}"
            return torch.zeros(3, self.crop, self.crop), index, message


def _torchvision_batches(source, ids, prep, batch_size, workers):
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(_Images(source, list(ids), val_transform(prep), int(prep["crop"])), batch_size=batch_size,
                        shuffle=False, num_workers=workers, pin_memory=torch.cuda.is_available())
    for images, _, errors in loader:
        bad = [e for e in errors if e]
        if bad:
            raise RuntimeError(bad[0] + (f" (and {len(bad) - 1} more in its batch)" if len(bad) > 1 else ""))
        yield images


def _dali_batches(source, ranks: Ranks, prep, batch_size, workers, backend, device):
    from data_pipelines import IMAGENET_MEAN, IMAGENET_STD
    from data_pipelines.dali.loader import DALILoader, PipelineOptions

    if [round(float(v), 6) for v in prep["mean"]] != [round(v, 6) for v in IMAGENET_MEAN] or \
            [round(float(v), 6) for v in prep["std"]] != [round(v, 6) for v in IMAGENET_STD]:
        raise ValueError(f"the model normalises with mean={prep['mean']} std={prep['std']}, and the DALI pipelines "
                         f"with ImageNet's: use --backend torchvision")
    crop = int(prep["crop"])
    # DALI always resizes; to the crop size, an image already at that size (ImageNet-C) stays as it is.
    resize = int(prep["resize"]) or crop
    gpu = backend == "dali_gpu"
    options = PipelineOptions(image_size=crop, val_resize=resize, device="gpu" if gpu else "cpu",
                              device_id=device.index if gpu else None, num_threads=max(1, workers),
                              output_device=device)
    loader = DALILoader(source, train=False, batch_size=batch_size, shard_id=ranks.rank, num_shards=ranks.world,
                        options=options)
    try:
        for images, _ in loader:
            yield images
    finally:
        loader.release()
        loader.reader.close()


def _gather(mine: torch.Tensor, n: int, ranks: Ranks, device) -> torch.Tensor:
    """Every rank's rows, in file order: each rank's slice padded to the longest, gathered, and
    the padding dropped, so no image is counted twice."""
    import torch
    import torch.distributed as dist

    from data_pipelines.sharding import val_indices

    sizes = [len(val_indices(n, shard_id=r, num_shards=ranks.world)) for r in range(ranks.world)]
    if mine.shape[0] != sizes[ranks.rank]:
        raise RuntimeError(f"rank {ranks.rank} computed {mine.shape[0]} rows for its {sizes[ranks.rank]} images")
    widths: list = [None] * ranks.world
    dist.all_gather_object(widths, int(mine.shape[1]) if mine.shape[0] else 0)  # a rank without images knows none
    width = max(widths)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(max(sizes), width, dtype=torch.float32, device=on)
    if mine.shape[0]:
        padded[: mine.shape[0]] = mine.to(on)
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


def forward_images(pretrained: Pretrained, files: Sequence[str], *, output: str = "logits", batch_size: int = 64,
                   backend: str = "torchvision", resize: int | None = None, crop: int | None = None,
                   workers: int = 2) -> torch.Tensor:
    """One row per file of ``files``, in their order, float32 on the CPU: the model's logits
    (``output="logits"``) or the pooled features its classifier ``fc`` takes (``"features"``).

    Preprocessing is the model's (shorter side to ``resize``, centre crop ``crop``, its mean and
    std), ``resize``/``crop`` overriding it (``resize=0``: no resize). ``backend``: "torchvision"
    (Pillow in ``workers`` DataLoader processes), "dali_cpu" or "dali_gpu" (``workers`` threads).
    Under a multi-process launch (torchrun, srun) each rank computes its contiguous slice of
    ``files`` (every rank must pass the same files) and every rank returns the whole tensor. An
    unreadable image raises a RuntimeError naming its file. The model is moved to this rank's GPU
    when there is one (``pretrained.model`` stays there).
    """
    from data_pipelines.sources import FolderSource

    files = [str(f) for f in files]
    return forward_source(pretrained, FolderSource(files, [0] * len(files)), output=output, batch_size=batch_size,
                          backend=backend, resize=resize, crop=crop, workers=workers)


def forward_source(pretrained: Pretrained, source, *, output: str = "logits", batch_size: int = 64,
                   backend: str = "torchvision", resize: int | None = None, crop: int | None = None,
                   workers: int = 2) -> torch.Tensor:
    """:func:`forward_images` over a :class:`data_pipelines.sources.Source` (a folder tree's
    split or a pack's): one row per sample id, in id order."""
    import torch

    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}: expected one of {', '.join(OUTPUTS)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    prep = preprocessing(pretrained, resize, crop)
    ranks = current_ranks()
    device = _device(pretrained, ranks, backend)
    model = pretrained.model.to(device) if device.type == "cuda" else pretrained.model
    model.eval()
    if backend == "torchvision":
        ids = source.val_ids(shard_id=ranks.rank, num_shards=ranks.world)
        batches = _torchvision_batches(source, ids, prep, batch_size, workers)
    else:
        batches = _dali_batches(source, ranks, prep, batch_size, workers, backend, device)
    rows: list[torch.Tensor] = []
    with torch.inference_mode(), _pooled_features(model, output) as features:
        for images in batches:
            logits = model(images.to(device, non_blocking=True).float())
            rows.append((features.pop() if output == "features" else logits).float().cpu().clone())
    mine = torch.cat(rows) if rows else torch.zeros(0, 0)
    if ranks.world > 1:
        return _gather(mine, len(source), ranks, device)
    return mine
