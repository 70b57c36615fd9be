"""Node-local staging (data.stage_to): one copier per node, verified copies, waiters that follow it.

The concurrency tests run real processes (forked from a forkserver that imported the module once,
so each costs milliseconds, not an interpreter start), each with its own launcher environment.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import shards, staging
from tests.conftest import VirtualClock

SHARDS = {"train": 4, "val": 2}
# How long a waiter process waits for its copier: a guard against a copier that never comes, not
# a measure of anything (the copies are a few MB; a loaded machine must not make it fire).
GUARD = 300.0


# -- a fake pack: staging only copies bytes ------------------------------------------------------
@pytest.fixture
def pack(tmp_path) -> Path:
    root = tmp_path / "shared" / "pack"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in SHARDS.items():
        entries, total = [], 0
        for i in range(count):
            data = rng.integers(0, 256, int(rng.integers(100_000, 300_000)), dtype=np.uint8).tobytes()
            tar, index = f"{split}-{i:06d}.tar", f"{split}-{i:06d}.idx"
            (root / tar).write_bytes(data)
            images = 3 + i
            lines = [f"jpg {k * 10} 5 n{k}/img{k}.jpg cls {k * 10 + 5} 1 n{k}/img{k}.cls" for k in range(images)]
            (root / index).write_text(f"{shards.INDEX_VERSION} {images}\n" + "\n".join(lines) + "\n")
            entries.append({"tar": tar, "index": index, "images": images, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
            total += images
        splits[split] = {"images": total, "shards": entries}
    manifest = {"format": shards.FORMAT, "version": shards.VERSION, "classes": ["n0", "n1"],
                "source_root": "/nowhere", "seed": 0, "shard_size": 300_000, "splits": splits, "skipped": []}
    (root / shards.MANIFEST).write_text(json.dumps(manifest, indent=1))
    assert len(shards.read_manifest(root).shards()) == sum(SHARDS.values())
    return root


@pytest.fixture(autouse=True)
def _no_token_leak():
    """A copier without a launch token puts one into os.environ: keep it out of other tests."""
    before = os.environ.pop(staging.TOKEN_VAR, None)
    yield
    os.environ.pop(staging.TOKEN_VAR, None)
    if before is not None:
        os.environ[staging.TOKEN_VAR] = before


def _slurm(job: str, *, local: int, proc: int | None = None, node: int = 0) -> dict:
    return {"SLURM_JOB_ID": job, "SLURM_LOCALID": str(local), "SLURM_PROCID": str(local if proc is None else proc),
            "SLURM_NODEID": str(node)}


def _tars(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


def _inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in _tars(folder)}


def _assert_copy_of(folder: Path, pack: Path) -> None:
    local = shards.read_manifest(folder)
    assert local.root == folder
    for shard in local.shards():
        assert shard.tar.parent == folder
        assert shard.tar.read_bytes() == (pack / shard.tar.name).read_bytes()
        assert shard.index.read_bytes() == (pack / shard.index.name).read_bytes()
    assert (folder / shards.MANIFEST).read_bytes() == (pack / shards.MANIFEST).read_bytes()
    assert not list(folder.rglob("*.tmp"))


# -- processes ----------------------------------------------------------------------------------
def _worker(root: str, stage_to: str, env: dict, timeout: float, log_path: str, out_path: str) -> None:
    logger = logging.getLogger("data_pipelines.staging")
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        result = {"folder": str(staging.staged_root(root, stage_to, env=env, timeout=timeout, threads=3))}
    except Exception as err:  # noqa: BLE001 - reported to the test
        result = {"error": type(err).__name__, "message": str(err)}
    Path(out_path).write_text(json.dumps(result))


_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["data_pipelines.staging", __name__])
    return _CONTEXT


def _run_all(pack: Path, runs: list[tuple[Path, dict]], tmp_path: Path, *, timeout: float = GUARD) -> list[dict]:
    """Run staged_root in one process per (stage_to, env), all at once: each one's result and log."""
    ctx, procs, files = _context(), [], []
    for n, (stage_to, env) in enumerate(runs):
        log_path, out_path = tmp_path / f"proc{n}.log", tmp_path / f"proc{n}.json"
        log_path.unlink(missing_ok=True)
        out_path.unlink(missing_ok=True)
        files.append((log_path, out_path))
        procs.append(ctx.Process(target=_worker, args=(str(pack), str(stage_to), env, timeout, str(log_path),
                                                       str(out_path))))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout + 60)
        assert p.exitcode == 0, f"a staging process ended with {p.exitcode}"
    results = []
    for log_path, out_path in files:
        result = json.loads(out_path.read_text())
        result["log"] = log_path.read_text() if log_path.exists() else ""
        results.append(result)
    return results


def _count(results: list[dict], what: str) -> dict[str, int]:
    """How often each file name was logged as ``what`` ("copied" or "reused") over all processes."""
    counts: dict[str, int] = {}
    for r in results:
        for line in r["log"].splitlines():
            if line.startswith(what + " "):
                name = Path(line.split(" ", 1)[1]).name
                counts[name] = counts.get(name, 0) + 1
    return counts


# -- the tests ----------------------------------------------------------------------------------
def test_one_node_three_processes_copy_each_shard_once(pack, tmp_path):
    stage_to = tmp_path / "node0"
    results = _run_all(pack, [(stage_to, _slurm("J1", local=i)) for i in range(3)], tmp_path)
    assert all("folder" in r for r in results), results
    folder = Path(results[0]["folder"])
    assert {r["folder"] for r in results} == {str(folder)}
    ident = hashlib.sha256((pack / shards.MANIFEST).read_bytes()).hexdigest()[:16]
    assert folder == stage_to / f"imagenet-trainer-{ident}"
    names = {p.name for p in _tars(pack)}
    assert _count(results, "copied") == {n: 1 for n in names}  # every shard copied once, by one process
    assert not _count(results, "reused")
    assert sum("copied" in r["log"] for r in results) == 1
    _assert_copy_of(folder, pack)
    ready = json.loads((stage_to / f"{folder.name}.ready-slurm-J1-0").read_text())
    assert ready["copied"] == len(names) and ready["reused"] == 0


def test_two_nodes_each_get_one_copy(pack, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]  # two nodes' local disks
    runs = [(nodes[node], _slurm("J1", local=local, proc=2 * node + local, node=node))
            for node in (0, 1) for local in (0, 1)]
    results = _run_all(pack, runs, tmp_path)
    assert all("folder" in r for r in results), results
    names = {p.name for p in _tars(pack)}
    for node, stage_to in enumerate(nodes):
        mine = results[2 * node : 2 * node + 2]
        folder = Path(mine[0]["folder"])
        assert folder.parent == stage_to and mine[1]["folder"] == str(folder)
        assert _count(mine, "copied") == {n: 1 for n in names}
        assert "copied" not in mine[1]["log"]  # the node's second process only waited
        _assert_copy_of(folder, pack)


def test_a_later_job_on_the_node_reuses_verified_copies(pack, tmp_path):
    stage_to = tmp_path / "node0"
    folder = staging.staged_root(pack, stage_to, env=_slurm("J1", local=0))
    _assert_copy_of(folder, pack)
    before = _inodes(folder)

    results = _run_all(pack, [(stage_to, _slurm("J2", local=i)) for i in range(2)], tmp_path)
    assert [r.get("folder") for r in results] == [str(folder)] * 2, results
    assert not _count(results, "copied")
    assert _count(results, "reused") == {n: 1 for n in before}
    assert _inodes(folder) == before  # nothing replaced
    ready = json.loads((stage_to / f"{folder.name}.ready-slurm-J2-0").read_text())
    assert ready["copied"] == 0 and ready["reused"] == len(before)
    _assert_copy_of(folder, pack)

    # a requeued job (SLURM_RESTART_COUNT) is a new launch: it checks the copies again
    requeued = {**_slurm("J2", local=0), "SLURM_RESTART_COUNT": "1"}
    assert staging.staged_root(pack, stage_to, env=requeued) == folder
    assert (stage_to / f"{folder.name}.ready-slurm-J2-1").is_file()


def test_corrupted_and_truncated_local_copies_are_copied_again(pack, tmp_path, caplog):
    stage_to = tmp_path / "node0"
    folder = staging.staged_root(pack, stage_to, env=_slurm("J1", local=0))
    tars = _tars(folder)
    before = _inodes(folder)
    flipped, truncated = tars[0], tars[3]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(flipped, "r+b") as f:  # in place: same size, same inode
        f.write(data)
    with open(truncated, "r+b") as f:
        f.truncate(1000)
    (folder / tars[1].name.replace(".tar", ".idx")).write_text("damaged index")

    with caplog.at_level(logging.DEBUG, logger="data_pipelines.staging"):
        assert staging.staged_root(pack, stage_to, env=_slurm("J2", local=0)) == folder
    copied = {Path(r.getMessage().split(" ", 1)[1]).name for r in caplog.records if r.getMessage().startswith("copied ")}
    assert copied == {flipped.name, truncated.name}
    after = _inodes(folder)
    for name, inode in before.items():
        assert (after[name] != inode) == (name in copied), name
    assert "does not match its sha256" in caplog.text and "has 1000 bytes" in caplog.text
    _assert_copy_of(folder, pack)


def test_a_damaged_source_shard_fails_every_process_of_the_node_at_once(pack, tmp_path):
    damaged = _tars(pack)[2]
    data = bytearray(damaged.read_bytes())
    data[7] ^= 0x01  # same size: read_manifest's size check passes, the sha256 does not
    damaged.write_bytes(bytes(data))
    stage_to = tmp_path / "node0"
    results = _run_all(pack, [(stage_to, _slurm("J1", local=i)) for i in range(3)], tmp_path)
    # The waiters raise the copier's own error (read from its failure marker), not StagingTimeout.
    assert all(r.get("error") == "StagingError" for r in results), results
    message = results[0]["message"]
    assert str(damaged) in message and "damaged" in message and "imagenet-trainer pack" in message
    for waiter in results[1:]:
        assert waiter["message"] == message
    assert not list(stage_to.rglob("*.tmp"))
    folder = stage_to / f"imagenet-trainer-{staging.pack_id((pack / shards.MANIFEST).read_bytes())}"
    assert not (folder / shards.MANIFEST).exists() and not (folder / damaged.name).exists()


def test_not_enough_space_says_so_and_leaves_nothing_partial(pack, tmp_path, monkeypatch):
    stage_to = tmp_path / "node0"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(staging.StagingError) as caught:
        staging.staged_root(pack, stage_to, env=_slurm("J1", local=0))
    message = str(caught.value)
    needed = sum(p.stat().st_size for p in pack.iterdir() if p.suffix in (".tar", ".idx"))
    assert f"data.stage_to={stage_to}" in message
    assert f"({needed} bytes) still to copy" in message and "(1000 bytes) free" in message
    assert "bigger" in message and "unset data.stage_to" in message
    assert not list(stage_to.rglob("*.tar")) and not list(stage_to.rglob("*.tmp"))
    assert not list(stage_to.rglob(shards.MANIFEST))

    with monkeypatch.context() as m:  # a waiter of the same job gets the same error at once
        m.setattr(staging, "time", clock := VirtualClock())
        with pytest.raises(staging.StagingError) as waited:
            staging.staged_root(pack, stage_to, env=_slurm("J1", local=1), timeout=30)
    assert str(waited.value) == message and clock.now == 0  # read on its first look, nothing waited for

    monkeypatch.setattr(shutil, "disk_usage", real)  # space freed, the job restarted: it stages
    folder = staging.staged_root(pack, stage_to, env=_slurm("J1", local=0))
    _assert_copy_of(folder, pack)
    assert not list(stage_to.glob("*.failed-*"))


def test_a_waiter_whose_copier_never_comes_times_out(pack, tmp_path, monkeypatch):
    stage_to = tmp_path / "node0"
    monkeypatch.setattr(staging, "time", clock := VirtualClock())
    with pytest.raises(staging.StagingTimeout) as caught:
        staging.staged_root(pack, stage_to, env=_slurm("J9", local=1), timeout=120)
    assert clock.now >= 120  # it waited the whole timeout
    message = str(caught.value)
    assert "waited 120 s" in message
    assert ".ready-slurm-J9-0" in message and str(stage_to) in message
    assert "SLURM_LOCALID=0" in message and "SLURM_LOCALID=1" in message  # whom it waited for; who it is


def test_unusable_stage_to_is_named(pack, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for stage_to in (blocker / "sub", blocker):
        with pytest.raises(staging.StagingError, match=f"data.stage_to={stage_to}"):
            staging.staged_root(pack, stage_to, env=_slurm("J1", local=0))


def test_launch_token_rule():
    token = staging.launch_token
    assert token({}) is None
    assert token({"SLURM_JOB_ID": "123"}) == "slurm-123-0"
    assert token({"SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "2", "SLURM_STEP_ID": "0"}) == "slurm-123-2-0"
    assert token({"TORCHELASTIC_RUN_ID": "abc"}) == "te-abc-0"
    assert token({"TORCHELASTIC_RUN_ID": "abc", "TORCHELASTIC_RESTART_COUNT": "1"}) == "te-abc-1"
    assert token({"SLURM_JOB_ID": "7", "TORCHELASTIC_RUN_ID": "x/y"}) == "slurm-7-0-te-x_y-0"
    assert token({staging.TOKEN_VAR: "mine", "SLURM_JOB_ID": "7"}) == "mine"


def test_a_copier_without_token_makes_one_for_its_children(pack, tmp_path, caplog):
    stage_to = tmp_path / "node0"
    folder = staging.staged_root(pack, stage_to, env={})  # Lightning's rank 0 before it starts the others
    made = os.environ[staging.TOKEN_VAR]
    assert (stage_to / f"{folder.name}.ready-{made}").is_file()
    child = {"LOCAL_RANK": "1", staging.TOKEN_VAR: made}  # a local rank it starts: inherits the token
    assert staging.staged_root(pack, stage_to, env=child, timeout=1) == folder
    with caplog.at_level(logging.DEBUG, logger="data_pipelines.staging"):  # rank 0 again, same launch
        assert staging.staged_root(pack, stage_to, env=dict(os.environ)) == folder
    assert "reused" not in caplog.text and "copied" not in caplog.text  # no second check
    _assert_copy_of(folder, pack)
