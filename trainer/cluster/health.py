"""The health check before the first step (``run.health_check``): a bad host fails in seconds with
exit 11 ("node", trainer/cluster/exits.py), and the supervisor (supervise.py) requeues the job
without it, instead of the job crashing or hanging somewhere in its first epoch.

Every rank, at the fit's start (:class:`HealthCheck`'s ``on_fit_start``: the process group exists,
the checkpoint is restored, no batch has been read), checks in this order:

1. on the GPU: an allocation of ALLOC_MB on its device;
2. the data: the first image of its own training data (``Source.load``: the file of a tree, the
   image in a pack's shard), read and decoded; a file that cannot be is named;
3. with more than one rank: an all-reduce, on the default group, of known values (rank + 1, whose
   sum is n (n + 1) / 2) and of each rank's verdict of 1. and 2., which must finish within
   ALLREDUCE_TIMEOUT_S;
4. on the GPU, with more than one rank and ``run.min_allreduce_gbps`` set, once every rank passed:
   the bus bandwidth of an all-reduce of ALLOC_MB (as nccl-tests computes it: size / time x
   2 (n - 1) / n), which must reach that many GB/s.

A first image that is read but does not decode is the data's fault, not the node's:
:class:`BadFirstImage` (exit 2, not retried). A rank whose own check failed otherwise raises
:class:`NodeUnhealthy` (exit 11, its host and what failed in
the message and in RUN_DIR/failures.jsonl); the ranks that passed learn it from the all-reduce and
raise :class:`PeerUnhealthy` (exit 12: their node is not excluded). A wrong sum, a timed-out
all-reduce or a bandwidth below the minimum fails every rank with exit 11 (no rank can tell whose
link is bad). Single-process runs skip the all-reduce. ``IMAGENET_TRAINER_FAULT=health@RANK:0``
(trainer/cluster/faults.py) fails that rank's check.

Each rank logs ``health check: passed in 0.005 s on HOST (rank R: ...)``; the cost on the CPU is
measured by bench/health_check.py.
"""
from __future__ import annotations

import datetime as _dt
import logging
import socket
import time
from dataclasses import dataclass, field

import pytorch_lightning as pl

from trainer.cluster import exits, faults

log = logging.getLogger("imagenet_trainer")

ALLREDUCE_TIMEOUT_S = 60.0  # the known-values all-reduce; ranks arrive together after DDP's set-up
ALLOC_MB = 256  # GPU memory allocated, and all-reduced for the bandwidth probe
BANDWIDTH_ITERS = 5  # timed all-reduces (after one warm-up)


class NodeUnhealthy(Exception):
    """This host failed its health check: exit 11 (``exits.NODE``), retried without this node."""

    exit_code = exits.NODE.code


class PeerUnhealthy(Exception):
    """Another rank failed its health check: exit 12 (``exits.PEER``), this node is not excluded."""

    exit_code = exits.PEER.code


@dataclass
class Report:
    """What a passed check did: its duration and what each part saw."""

    host: str
    rank: int
    seconds: float = 0.0
    parts: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"health check: passed in {self.seconds:.3f} s on {self.host} (rank {self.rank}: {'; '.join(self.parts)})"


def first_train_item(datamodule, rank: int, world: int):
    """(source, id) of the first sample rank ``rank`` trains on in epoch 0, or None when the data
    has no files (synthetic) or the module is not ours."""
    if datamodule is None or getattr(datamodule, "backend", "synthetic") == "synthetic":
        return None
    source = datamodule.splits[0]
    d = datamodule.data
    ids = source.train_ids(epoch=0, seed=d.seed, shard_id=rank, num_shards=world, batch_size=d.batch_size)
    return (source, int(ids[0])) if len(ids) else None


def _read_first(item) -> str:
    """Read and decode ``item`` (source, id); what was read. A failure names the file."""
    source, i = item
    try:
        name = source.describe(i)
    except Exception as err:  # noqa: BLE001 - a pack's index that cannot be read
        raise _Failed(f"cannot read the index of training image {i}: {err}") from err
    try:
        image, _ = source.load(i)
    except Exception as err:  # noqa: BLE001 - whatever the reader or the decoder raises
        if _from_the_file_system(err):  # a missing mount, EIO, ESTALE: this node's fault
            raise _Failed(f"cannot read its first training image {name}: {err}") from err
        # Read, but not an image (Pillow's errors carry no errno): the data's, on every node alike.
        hint = "" if "check-data" in str(err) else "; run `imagenet-trainer check-data` to list every bad file"
        raise BadFirstImage(f"health check: the first training image {name} does not decode: {err}{hint}") from err
    return f"read {name} ({image.width}x{image.height})"


def _from_the_file_system(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) is the OS refusing a read (it has an errno)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno is not None:
            return True
        err = err.__cause__ or err.__context__
    return False


class _Failed(Exception):
    """One part of this rank's own check failed (the message says what)."""


class BadFirstImage(ValueError):
    """The first image was read but does not decode: a data error (exit 2, not retried: another
    node would read the same bytes), raised after the all-reduce so that the other ranks leave too."""


def _allocate(device) -> str:
    """Allocate (and fill) ALLOC_MB on the GPU ``device``."""
    import torch

    try:
        buf = torch.ones(ALLOC_MB * 2**20 // 4, dtype=torch.float32, device=device)
        torch.cuda.synchronize(device)
        del buf
    except Exception as err:  # noqa: BLE001 - out of memory, a bad GPU (ECC, Xid)
        raise _Failed(f"cannot allocate {ALLOC_MB} MB on {device}: {err}") from err
    return f"allocated {ALLOC_MB} MB on {device}"


def _bandwidth(device, world: int, min_gbps: float) -> str:
    """Time an all-reduce of ALLOC_MB on ``device`` across the ``world`` ranks; its bus bandwidth
    must reach ``min_gbps``. A collective: every rank calls it, after every rank's own check passed."""
    import torch

    buf = torch.ones(ALLOC_MB * 2**20 // 4, dtype=torch.float32, device=device)
    gbps = allreduce_busbw(buf, world)
    del buf
    if gbps < min_gbps:
        raise _Failed(f"the all-reduce bus bandwidth of {ALLOC_MB} MB across {world} ranks is {gbps:.1f} GB/s, "
                      f"below run.min_allreduce_gbps={min_gbps}")
    return f"all-reduce bus bandwidth {gbps:.1f} GB/s"


def allreduce_busbw(buf, world: int, *, group=None, iters: int = BANDWIDTH_ITERS) -> float:
    """The bus bandwidth (GB/s) of all-reducing ``buf`` across ``world`` ranks, as nccl-tests
    reports it: bytes / seconds per all-reduce x 2 (n - 1) / n. Collective: every rank calls it."""
    import torch
    import torch.distributed as dist

    cuda = buf.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(buf.device)

    dist.all_reduce(buf, group=group)  # warm-up (the communicator, the buffers)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf, group=group)
    sync()
    # The slowest rank's time on every rank: each compares the same number with the minimum, so all
    # pass or all fail (a verdict on some ranks only would leave the others in their next collective).
    slowest = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=buf.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    seconds = float(slowest.item())
    size = buf.numel() * buf.element_size()
    return size / seconds * 2 * (world - 1) / world / 1e9


def _allreduce_check(rank: int, world: int, bad: bool, device, timeout_s: float) -> int:
    """All-reduce [rank + 1, bad] on the default group within ``timeout_s``; the number of ranks
    whose own check failed. A wrong sum or a timeout raises _Failed."""
    import torch
    import torch.distributed as dist

    try:
        # Inside the try: on a GPU in a bad state making the tensor fails too, and must be reported.
        t = torch.tensor([rank + 1, int(bad)], dtype=torch.float64, device=device)  # exact sums (gloo, NCCL)
        work = dist.all_reduce(t, async_op=True)
        work.wait(timeout=_dt.timedelta(seconds=timeout_s))
        total, failed = (int(round(v)) for v in t.tolist())
    except Exception as err:  # noqa: BLE001 - gloo/NCCL raise their own errors
        raise _Failed(f"the all-reduce of known values across {world} ranks did not complete within "
                      f"{timeout_s:.0f} s: {type(err).__name__}: {str(err)[:300]}") from err
    expected = world * (world + 1) // 2
    if total != expected:
        raise _Failed(f"the all-reduce of known values across {world} ranks gave {total}, not {expected}")
    return failed


def check_node(*, rank: int = 0, world: int = 1, device=None, datamodule=None, min_allreduce_gbps: float | None = None,
               timeout_s: float = ALLREDUCE_TIMEOUT_S, host: str | None = None) -> Report:
    """Run this rank's health check (see the module doc); its report, or NodeUnhealthy (this host
    failed) or PeerUnhealthy (another rank did). With ``world`` > 1 it is a collective: every rank
    of the default process group must call it."""
    import torch

    host = host or socket.gethostname()
    device = torch.device(device or "cpu")
    report = Report(host, rank)
    t0 = time.perf_counter()
    why = None
    bad_data = None
    try:
        if faults.due("health", rank, 0):
            raise _Failed("injected fault (IMAGENET_TRAINER_FAULT)")
        if device.type == "cuda":
            report.parts.append(_allocate(device))
        item = first_train_item(datamodule, rank, world)
        report.parts.append(_read_first(item) if item is not None else "no data files to read (synthetic)")
    except _Failed as err:
        why = str(err)
    except BadFirstImage as err:
        why, bad_data = str(err), err
    # The all-reduce runs on every rank, after its own parts: the ranks that passed learn that one
    # did not and leave at once (exit 12) instead of timing out in their first collective.
    if world > 1:
        try:
            failed = _allreduce_check(rank, world, why is not None, device, timeout_s)
            if why is None and failed:
                raise PeerUnhealthy(f"health check: {failed} other rank(s) of {world} failed their health check "
                                    f"(see failures.jsonl); rank {rank} on {host} passed")
            if why is None:
                report.parts.append(f"all-reduce of {world} ranks ok")
                if device.type == "cuda" and min_allreduce_gbps is not None:  # every rank, or none
                    report.parts.append(_bandwidth(device, world, min_allreduce_gbps))
        except _Failed as err:
            why = f"{why}; {err}" if why else str(err)
    report.seconds = time.perf_counter() - t0
    if bad_data is not None:
        raise bad_data
    if why is not None:
        raise NodeUnhealthy(f"health check failed on {host} (rank {rank}) after {report.seconds:.3f} s: {why}")
    return report


class HealthCheck(pl.Callback):
    """Runs :func:`check_node` on every rank at the fit's start (before the sanity check and the
    first step), and logs its duration."""

    def __init__(self, *, min_allreduce_gbps: float | None = None, timeout_s: float = ALLREDUCE_TIMEOUT_S) -> None:
        self.min_allreduce_gbps, self.timeout_s = min_allreduce_gbps, timeout_s
        self.report: Report | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch.distributed as dist

        world = trainer.world_size if dist.is_available() and dist.is_initialized() else 1
        device = trainer.strategy.root_device
        self.report = check_node(rank=trainer.global_rank, world=world, device=device,
                                 datamodule=trainer.datamodule, min_allreduce_gbps=self.min_allreduce_gbps,
                                 timeout_s=self.timeout_s)
        log.info(self.report.line())
