"""What the health check before the first step (trainer/cluster/health.py) costs on the CPU.

    python bench/health_check.py                  # about half a minute on a 2-core CPU
    python bench/health_check.py --rounds 20 --image-size 500 375

Each check runs once cold (the first call, as in a fit: imports, the first collective), then
``--rounds`` times, on a sample tree of ImageNet-sized JPEGs:

    1 process     check_node with the datamodule (no all-reduce): reading and decoding this rank's
                  first training image (the permutation of the epoch's order included)
    2 gloo ranks  check_node on each of 2 processes (gloo over TCP on this host): the same read,
                  then the all-reduce of known values and verdicts; the slower rank's time counts
    all-reduce    the known-values all-reduce alone (2 gloo ranks), without the data

The table gives the median over rounds (min, max) in milliseconds. The GPU parts (a 256 MB allocation,
the bandwidth probe) need a GPU and are not measured here. Results belong in bench/RESULTS.md
with their machine.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _datamodule(root: Path):
    from trainer.config import load_config
    from trainer.run import build_datamodule

    return build_datamodule(load_config(["experiment=smoke", "data.backend=torchvision", "data.num_workers=0",
                                         "trainer.accelerator=cpu", f"data.root={root}"]))


def one_process(root: Path, rounds: int) -> list[float]:
    from trainer.cluster.health import check_node

    dm = _datamodule(root)
    dm.splits  # the tree's listing: the fit's, before the check
    t0 = time.perf_counter()
    check_node(datamodule=dm)  # the first call, as in a fit (imports, Pillow's plugins)
    times = [time.perf_counter() - t0]
    for _ in range(rounds):
        t0 = time.perf_counter()
        check_node(datamodule=dm)
        times.append(time.perf_counter() - t0)
    return times


def _rank(rank: int, port: int, root: str, rounds: int, out) -> None:
    os.environ.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    import torch.distributed as dist

    from trainer.cluster import health

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dm = _datamodule(Path(root))
    dm.splits
    dist.barrier()
    t0 = time.perf_counter()
    health.check_node(rank=rank, world=2, datamodule=dm)  # the first call, as in a fit
    full, reduce_only = [time.perf_counter() - t0], []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        health.check_node(rank=rank, world=2, datamodule=dm)
        full.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        health.check_node(rank=rank, world=2)  # no data: the all-reduce alone
        reduce_only.append(time.perf_counter() - t0)
    out.put((rank, full, reduce_only))
    dist.destroy_process_group()


def two_ranks(root: Path, rounds: int) -> tuple[list[float], list[float]]:
    import multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, str(root), rounds, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    full = [max(a, b) for a, b in zip(*(r[1] for r in results))]  # [first call, rounds...]
    reduce_only = [max(a, b) for a, b in zip(*(r[2] for r in results))]
    return full, reduce_only


def _first_row(name: str, times: list[float]) -> str:
    return f"| {name}, first call (cold) | {times[0] * 1000:.1f} |"


def _row(name: str, times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return f"| {name} | {statistics.median(ms):.1f} ({min(ms):.1f}, {max(ms):.1f}) |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--image-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                   help="the sample JPEGs' size (ImageNet's typical 500x375)")
    args = p.parse_args(argv)
    from data_pipelines.sample import make_sample_tree

    with tempfile.TemporaryDirectory() as tmp:
        root = make_sample_tree(Path(tmp) / "tree", num_classes=4, train_per_class=16, val_per_class=2,
                                image_size=tuple(args.image_size))
        single = one_process(root, args.rounds)
        full, reduce_only = two_ranks(root, args.rounds)
    print(f"health check on the CPU ({os.cpu_count()} cores), {args.rounds} rounds, "
          f"{args.image_size[0]}x{args.image_size[1]} JPEGs: median (min, max) ms")
    print("| check | ms |\n|---|---|")
    print(_first_row("1 process", single))
    print(_row("1 process (first image read and decoded)", single[1:]))
    print(_first_row("2 gloo ranks", full))
    print(_row("2 gloo ranks (image + all-reduce, slower rank)", full[1:]))
    print(_row("2 gloo ranks, all-reduce of known values only", reduce_only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
