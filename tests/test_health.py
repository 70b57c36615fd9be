"""The health check before the first step (trainer/cluster/health.py).

The fast tests run the check in this process on a tiny tree (one rank: no all-reduce). The slow one
runs 2 real DDP ranks (gloo, CPU) of `imagenet-trainer fit` (tests/test_failures.py's Ranks) with
rank 1's check failed by IMAGENET_TRAINER_FAULT: it exits 11 with a record naming its host, and
rank 0 learns it from the check's all-reduce and exits 12 at once.
"""
from __future__ import annotations

import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import CPU_FIT
from trainer.cluster import exits, failures, faults
from trainer.cluster.health import (BadFirstImage, HealthCheck, NodeUnhealthy, PeerUnhealthy, allreduce_busbw, check_node,
                                    first_train_item)
from trainer.config import ConfigError, load_config


def _datamodule(root: Path, *overrides: str):
    from trainer.run import build_datamodule

    return build_datamodule(load_config([*CPU_FIT, f"data.root={root}", *overrides]))


def test_the_check_passes_on_a_tiny_tree_reading_this_ranks_first_image(tiny_root):
    dm = _datamodule(tiny_root)
    report = check_node(datamodule=dm)
    source, first = first_train_item(dm, 0, 1)
    assert report.host == socket.gethostname() and report.rank == 0 and 0 <= report.seconds < 5
    (part,) = report.parts
    assert re.fullmatch(rf"read {re.escape(source.describe(first))} \(\d+x\d+\)", part), part
    assert report.line().startswith(f"health check: passed in {report.seconds:.3f} s on {socket.gethostname()}")
    # Another rank of 2 reads its own first image, not rank 0's.
    assert first_train_item(dm, 1, 2)[1] != first_train_item(dm, 0, 2)[1]


def test_a_pack_and_synthetic_data_pass_too(tiny_pack):
    assert check_node(datamodule=_datamodule(tiny_pack)).parts[0].startswith("read ")
    synthetic = _datamodule("/nowhere", "data.backend=synthetic")
    assert check_node(datamodule=synthetic).parts == ["no data files to read (synthetic)"]


def test_a_corrupted_or_missing_first_image_fails_the_check_naming_the_file_and_the_host(tiny_root, tmp_path):
    root = Path(shutil.copytree(tiny_root, tmp_path / "tree"))
    dm = _datamodule(root)
    source, first = first_train_item(dm, 0, 1)
    bad = Path(source.describe(first))
    bad.write_bytes(b"not a jpeg" * 10)
    # Read but not an image: the data's fault on every node, a data error (the CLI's exit 2, not retried).
    with pytest.raises(BadFirstImage, match=re.escape(str(bad))) as caught:
        check_node(datamodule=dm)
    assert isinstance(caught.value, ValueError) and "check-data" in str(caught.value)
    bad.unlink()  # a file the file system cannot give (a stale mount): this node's fault, exit 11
    with pytest.raises(NodeUnhealthy) as caught:
        check_node(datamodule=dm)
    message = str(caught.value)
    assert f"on {socket.gethostname()} (rank 0)" in message and str(bad) in message, message
    assert failures.classify(caught.value) is exits.NODE


def test_the_health_fault_fails_that_ranks_check_only(tiny_root, monkeypatch):
    monkeypatch.setenv(faults.ENV, "health@0:0")
    with pytest.raises(NodeUnhealthy, match="injected fault") as caught:
        check_node(datamodule=_datamodule(tiny_root))
    assert caught.value.exit_code == 11 and failures.classify(caught.value) is exits.NODE
    monkeypatch.setenv(faults.ENV, "health@1:0")
    check_node(rank=0)
    monkeypatch.setenv(faults.ENV, "health@0:0:1")  # only on the first requeue
    check_node(rank=0)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(NodeUnhealthy):
        check_node(rank=0)


def test_a_peers_failure_is_a_peer_exit_and_a_failure_is_recorded_with_its_own_code(tmp_path):
    from trainer.cluster.failfast import record_failure

    assert failures.classify(PeerUnhealthy("x")) is exits.PEER
    err = NodeUnhealthy(f"health check failed on {socket.gethostname()} (rank 1): injected fault")
    assert record_failure(tmp_path, err, rank=1) is exits.NODE
    (rec,) = failures.read(tmp_path)
    assert rec["exit_code"] == 11 and rec["cause"] == "node" and rec["retry"] is True
    assert socket.gethostname() in rec["detail"] and "NodeUnhealthy" in rec["detail"]


def test_the_bandwidth_probe_runs_on_a_gloo_group_of_one(monkeypatch):
    """The GPU's bandwidth probe cannot run here; its timing code can, on the CPU (gloo)."""
    import torch
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        buf = torch.ones(1 << 16)
        assert allreduce_busbw(buf, 1, iters=2) == 0.0  # one rank moves nothing over the bus
        assert allreduce_busbw(buf, 2, iters=2) > 0
        assert check_node(rank=0, world=1).parts  # a group of one: no all-reduce of known values
    finally:
        dist.destroy_process_group()
    callback = HealthCheck(min_allreduce_gbps=100.0)
    assert callback.min_allreduce_gbps == 100.0 and callback.report is None


def test_health_settings_default_to_on_without_a_bandwidth_minimum():
    cfg = load_config(["data.root=/x"])
    assert cfg.run.health_check is True and cfg.run.min_allreduce_gbps is None
    assert load_config(["data.root=/x", "run.min_allreduce_gbps=40"]).run.min_allreduce_gbps == 40
    with pytest.raises(ConfigError, match="run.min_allreduce_gbps"):
        load_config(["data.root=/x", "run.min_allreduce_gbps=0"])


def test_the_fit_runs_the_check_only_when_enabled(tmp_path):
    from trainer.run import _callbacks

    def names(*overrides):
        cfg = load_config([*CPU_FIT, "data.root=/x", f"run.dir={tmp_path}", *overrides])
        return [type(c).__name__ for c in _callbacks(cfg, tmp_path, True, alloc=None, on_gpu=False, tty=False)]

    assert names()[:2] == ["FailFast", "HealthCheck"]
    assert "HealthCheck" not in names("run.health_check=false")


@pytest.mark.slow
def test_a_failed_health_check_exits_11_naming_the_host_and_its_peer_exits_at_once(tiny_root, tmp_path):
    from tests.test_failures import FAST, Ranks

    job = Ranks(tiny_root, tmp_path, *FAST, fault="health@1:0")
    try:
        started = time.time()
        codes = job.wait(180)
    finally:
        job.kill()
    assert codes == {0: exits.PEER.code, 1: exits.NODE.code}, job.logs()
    assert max(job.ended.values()) - started < 60, job.ended  # no timeout waited out
    by_rank = {r["rank"]: r for r in failures.read(job.run_dir)}
    assert by_rank[1]["cause"] == "node" and by_rank[1]["exit_code"] == 11, by_rank
    assert f"health check failed on {socket.gethostname()} (rank 1)" in by_rank[1]["detail"]
    assert "injected fault" in by_rank[1]["detail"]
    assert by_rank[0]["cause"] == "peer" and "other rank(s)" in by_rank[0]["detail"]
    log1 = (tmp_path / "rank1.log").read_text()
    assert "exit 11" in log1 and "health check failed on" in log1, log1[-3000:]
    assert not (job.run_dir / "checkpoints").exists() or not any((job.run_dir / "checkpoints").iterdir())
