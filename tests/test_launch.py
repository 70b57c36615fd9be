"""The launch layer (data_pipelines/launch.py) and the shared file helpers it goes with: atomic
writes and one process working while the others wait (data_pipelines/files.py)."""
from __future__ import annotations

import os

import pytest

from data_pipelines import files, launch

SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_NNODES": "4",
        "SLURM_GPUS_ON_NODE": "2"}


@pytest.mark.parametrize(
    "env, kind, ranks",  # ranks: (global, local, node, world size)
    [
        ({}, launch.NONE, (0, 0, 0, 1)),
        (SRUN, launch.SRUN, (5, 1, 2, 8)),
        ({"TORCHELASTIC_RUN_ID": "r", "RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1", "WORLD_SIZE": "16",
          "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1"}, launch.TORCHRUN, (9, 1, 1, 16)),
        ({"LOCAL_RANK": "3", "NODE_RANK": "0", "WORLD_SIZE": "4"}, launch.LIGHTNING, (3, 3, 0, 4)),
        ({"LOCAL_RANK": "3", "NODE_RANK": "1", "WORLD_SIZE": "8"}, launch.LIGHTNING, (None, 3, 1, 8)),
        # Lightning's own local ranks inside an sbatch script (not an srun step).
        ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "LOCAL_RANK": "2"}, launch.LIGHTNING, (2, 2, 0, None)),
    ],
)
def test_the_launcher_and_its_ranks(env, kind, ranks):
    got = launch.current(env)
    assert got.launcher == kind
    assert (got.global_rank, got.local_rank, got.node_rank, got.world_size) == ranks
    assert got.position == launch.launch_position(env)
    assert got.token == launch.launch_token(env)


def test_the_allocation_of_an_srun_step():
    alloc = launch.allocation(SRUN)
    assert (alloc.job_id, alloc.num_nodes, alloc.tasks_per_node, alloc.gpus_per_node) == ("77", 4, 2, 2)
    assert launch.allocation({**SRUN, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:4"}).gpus_per_node == 4
    assert launch.allocation({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}) is None  # the batch script
    with pytest.raises(launch.SlurmConfigError, match="different task counts"):
        launch.allocation({**SRUN, "SLURM_TASKS_PER_NODE": "2,1"})


def test_the_job_group_is_the_array_or_the_job():
    assert launch.job_group({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4200"}) == "4200"
    assert launch.job_group({"SLURM_JOB_ID": "4243"}) == "4243"
    assert launch.job_group({}) is None


def test_a_made_up_token_is_inherited(monkeypatch):
    monkeypatch.delenv(launch.TOKEN_VAR, raising=False)
    token = launch.make_launch_token()
    assert os.environ[launch.TOKEN_VAR] == token
    assert launch.launch_token({"LOCAL_RANK": "1", launch.TOKEN_VAR: token}) == token


@pytest.mark.parametrize("unique", [False, True])
def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path, unique):
    path = tmp_path / "sub" / "file.json"
    files.write_atomic(path, "one", unique=unique)
    files.write_atomic(path, b"two", fsync=False, unique=unique)
    assert path.read_bytes() == b"two"
    with pytest.raises(RuntimeError), files.atomic_path(path, unique=unique) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer failed")
    assert path.read_bytes() == b"two"  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.json"]
    assert files.temp_path(path).name == ".file.json.tmp"
    assert files.temp_path(path, unique=True) != files.temp_path(path, unique=True)


def test_wait_for_returns_raises_or_times_out(tmp_path):
    marker = tmp_path / "done"
    calls = []

    def check(waited):
        calls.append(waited)
        if len(calls) == 3:
            files.write_marker(marker, {"state": "ready"})
        record = files.read_marker(marker)
        return record["state"] if record else files.WAIT

    assert files.wait_for(check, timeout=60, on_timeout=lambda: AssertionError("timed out")) == "ready"
    assert len(calls) == 3 and files.read_marker(marker)["pid"] == os.getpid()

    def failed(waited):
        raise ValueError("the worker's error")

    with pytest.raises(ValueError, match="the worker's error"):
        files.wait_for(failed, timeout=60, on_timeout=lambda: AssertionError("timed out"))
    with pytest.raises(TimeoutError, match="nobody came"):
        files.wait_for(lambda waited: files.WAIT, timeout=0.05, on_timeout=lambda: TimeoutError("nobody came"))
