"""One listing per job: the processes of a job started together list each split once, all get the
same list, and a process that waits for a list that never comes stops with an error naming it."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipelines import filelist, layout
from data_pipelines.filelist import LaunchPosition, ListingTimeout
from data_pipelines.sample import make_sample_tree
from tests.conftest import VirtualClock

REPO = Path(__file__).resolve().parent.parent
WAITER = LaunchPosition(first_in_job=False, first_on_node=False, described="rank 3")
NODE_FIRST = LaunchPosition(first_in_job=False, first_on_node=True, described="rank 2")
RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")

# One process of the job: counts its own calls of the function that walks the class folders,
# waits for the others at a barrier, then lists the tree as a training run does.
RANK_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
from data_pipelines import layout

out = Path(sys.argv[2])
me = os.getpid()
scan = layout.scan_split

def counted(root, split, classes=None):
    with open(out / f"scans-{me}.txt", "a") as f:
        f.write(split + "\n")
    return scan(root, split, classes)

layout.scan_split = counted
from data_pipelines.datamodule import ImageNetDataModule
from data_pipelines.specs import DataSpec

dm = ImageNetDataModule(DataSpec(root=sys.argv[1], backend="torchvision", batch_size=2,
                                 image_size=32, val_resize=32, num_workers=0, seed=0), on_gpu=False)
(out / f"ready-{me}").touch()
while not (out / "go").exists():
    time.sleep(0.005)
train, val = dm.splits
(out / f"lists-{me}.json").write_text(json.dumps([train.files, train.labels, val.files, val.labels]))
"""


def _age(root: Path, seconds: float = 60.0) -> None:
    """Move every folder's mtime into the past: a tree written just now is not cached (filelist.py)."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


@pytest.fixture
def root(tmp_path) -> Path:
    root = make_sample_tree(tmp_path / "imagenet", num_classes=4, train_per_class=8, val_per_class=2,
                            image_size=(32, 32))
    _age(root)
    return root


def _job_env(cache_home: Path, ranks: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}  # not the runner's own ranks
    env.update({k: str(v) for k, v in ranks.items()})
    env.update(XDG_CACHE_HOME=str(cache_home), PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return env


LAUNCHERS = {
    "torchrun, one node": lambda r: {"RANK": r, "LOCAL_RANK": r, "GROUP_RANK": 0},
    "srun, two nodes": lambda r: {"SLURM_PROCID": r, "SLURM_LOCALID": r % 2, "SLURM_NODEID": r // 2},
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.slow
def test_four_processes_list_each_split_once_and_get_the_same_lists(root, tmp_path, launcher):
    out, cache_home = tmp_path / "out", tmp_path / "xdg"
    out.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(root), str(out)], cwd=REPO,
                         env=_job_env(cache_home, LAUNCHERS[launcher](r)), stderr=subprocess.PIPE, text=True)
        for r in range(4)
    ]
    try:
        deadline = time.monotonic() + 600  # guards against a process that never gets ready, not a measure
        while len(list(out.glob("ready-*"))) < 4 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs if p.poll()]
            time.sleep(0.05)
        (out / "go").touch()  # all four ask for the lists at once, against an empty cache
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
    finally:
        for p in procs:
            p.kill()

    scans = [line for f in out.glob("scans-*.txt") for line in f.read_text().split()]
    assert sorted(scans) == ["train", "val"]
    lists = [json.loads(f.read_text()) for f in sorted(out.glob("lists-*.json"))]
    assert len(lists) == 4 and all(x == lists[0] for x in lists)
    train = layout.scan_split(root, "train")
    val = layout.scan_split(root, "val", classes=train.classes)
    assert lists[0] == [train.files, train.labels, val.files, val.labels]
    assert len(list((cache_home / "imagenet-trainer").glob("*.txt"))) == 2
    assert not list((cache_home / "imagenet-trainer").glob("*.note"))  # nothing left for anyone to wait on


def test_a_waiter_times_out_naming_the_file_when_no_list_comes(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setattr(filelist, "time", clock := VirtualClock())
    with pytest.raises(ListingTimeout) as err:
        filelist.cached_split(root, "train", cache_dir=cache, launch=WAITER, timeout=120)
    assert clock.now >= 120  # it waited the whole timeout
    message = str(err.value)
    assert "waited 120 s" in message
    assert str(filelist.cache_path(root, "train", cache_dir=cache)) in message
    assert "rank 3 waited" in message and "data.filelist_cache=false" in message


def test_a_lister_times_out_naming_the_lock_held_by_another(root, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = filelist._lock_file(filelist.cache_path(root, "train", cache_dir=cache))
    with open(lock, "w") as held:  # another open file: flock treats it as another process
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ListingTimeout, match=str(lock)):
            filelist.cached_split(root, "train", cache_dir=cache, timeout=0.3)
    assert filelist.cached_split(root, "train", cache_dir=cache) == layout.scan_split(root, "train")


def test_a_lister_reads_the_list_written_while_it_waited_for_the_lock(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = filelist.cached_split(root, "train", cache_dir=cache)
    path = filelist.cache_path(root, "train", cache_dir=cache)
    text = path.read_text()
    path.unlink()
    real_locked = filelist._locked

    def locked_after_another_lister(lock, **kwargs):
        path.write_text(text)  # what the lock's holder wrote before letting go
        return real_locked(lock, **kwargs)

    monkeypatch.setattr(filelist, "_locked", locked_after_another_lister)
    monkeypatch.setattr(layout, "scan_split", lambda *a, **k: pytest.fail("listed again"))
    assert filelist.cached_split(root, "train", cache_dir=cache) == first


def test_waiters_get_the_listers_layout_error_at_once(tmp_path, monkeypatch):
    root = make_sample_tree(tmp_path / "imagenet", num_classes=2, train_per_class=2, val_per_class=1,
                            image_size=(32, 32))
    (root / "train" / "n_empty").mkdir()
    _age(root)
    cache = tmp_path / "cache"
    with pytest.raises(layout.DataLayoutError, match="holds no images"):
        filelist.cached_split(root, "train", cache_dir=cache)
    monkeypatch.setattr(filelist, "time", clock := VirtualClock())
    with pytest.raises(layout.DataLayoutError, match="n_empty holds no images"):
        filelist.cached_split(root, "train", cache_dir=cache, launch=WAITER, timeout=60)
    assert clock.now == 0  # at once: the lister's note was read on the first look, nothing waited for


def test_waiters_list_a_tree_too_fresh_to_cache_themselves(tmp_path, monkeypatch):
    root = make_sample_tree(tmp_path / "imagenet", num_classes=2, train_per_class=2, val_per_class=1,
                            image_size=(32, 32))  # just written: not cached (filelist.py)
    # "Just" however long writing the tree took on a loaded machine: every change counts as recent.
    monkeypatch.setattr(filelist, "_RACY_SECONDS", 10**9)
    cache = tmp_path / "cache"
    assert filelist.cached_split(root, "train", cache_dir=cache) == layout.scan_split(root, "train")
    assert not list(cache.glob("*.txt"))
    assert filelist.cached_split(root, "train", cache_dir=cache, launch=WAITER, timeout=60) == \
        layout.scan_split(root, "train")


def test_a_nodes_first_process_lists_when_no_lister_shares_its_cache_folder(root, tmp_path):
    cache = tmp_path / "node1-cache"  # rank 0 writes to its own node's folder, never seen here
    got = filelist.cached_split(root, "train", cache_dir=cache, launch=NODE_FIRST, grace=0.2, timeout=60)
    assert got == layout.scan_split(root, "train")
    assert filelist.cache_path(root, "train", cache_dir=cache).is_file()


def test_a_nodes_first_process_waits_for_a_lister_that_shares_its_folder(root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # Waits in virtual time: a real 0.5 s timeout would call this test's note stale on a slow machine.
    monkeypatch.setattr(filelist, "time", clock := VirtualClock())
    cache.mkdir()
    note = filelist._note_file(filelist.cache_path(root, "train", cache_dir=cache))
    note.write_text(json.dumps({"state": "listing", "host": socket.gethostname(), "pid": os.getpid(),
                                "time": time.time()}))  # a live lister (this test) on the shared folder
    with pytest.raises(ListingTimeout, match="says listing by pid"):
        filelist.cached_split(root, "train", cache_dir=cache, launch=NODE_FIRST, grace=0.1, timeout=120)
    assert clock.now >= 120  # past the grace period, up to the timeout: it did not list for itself

    # The same note left by a lister that died: not a lister, so the node lists for itself.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    note.write_text(json.dumps({"state": "listing", "host": socket.gethostname(), "pid": int(dead.stdout),
                                "time": time.time()}))
    got = filelist.cached_split(root, "train", cache_dir=cache, launch=NODE_FIRST, grace=0.1, timeout=60)
    assert got == layout.scan_split(root, "train") and not note.exists()


@pytest.mark.parametrize(
    "env, first_in_job, first_on_node",
    [
        ({}, True, True),  # a single process, or Lightning's launcher before it starts the others
        ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True, True),  # torchrun
        ({"RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1"}, False, False),
        ({"RANK": "8", "LOCAL_RANK": "0", "GROUP_RANK": "1", "SLURM_PROCID": "1"}, False, True),  # srun + torchrun
        ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}, True, True),  # srun
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2"}, False, False),
        ({"SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2"}, False, True),
        ({"LOCAL_RANK": "3", "NODE_RANK": "0"}, False, False),  # started by Lightning's launcher
        ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False, True),
        ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "LOCAL_RANK": "2"}, False, False),  # Lightning's, in sbatch
    ],
)
def test_launch_position_reads_every_launchers_ranks(env, first_in_job, first_on_node):
    position = filelist.launch_position(env)
    assert (position.first_in_job, position.first_on_node) == (first_in_job, first_on_node)


def test_a_rank_variable_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        filelist.launch_position({"SLURM_PROCID": "x"})
