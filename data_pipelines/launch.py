"""The launch layer: what the launcher that started this process says about it, read from the
environment (``os.environ`` unless a mapping is passed), before any process group exists.

Three launchers are known, besides none (a single process):

* ``srun`` (SLURM): ``SLURM_PROCID`` (global rank), ``SLURM_LOCALID``, ``SLURM_NODEID``,
  ``SLURM_NTASKS``; an ``srun`` step also has ``SLURM_STEP_ID``;
* ``torchrun`` (``TORCHELASTIC_RUN_ID``): ``RANK``, ``LOCAL_RANK``, ``GROUP_RANK`` (the node),
  ``WORLD_SIZE``; under ``srun`` + torchrun ``SLURM_PROCID`` is the node, ``RANK`` the rank;
* Lightning's own launcher, which starts local ranks > 0 as children of rank 0 with ``LOCAL_RANK``,
  ``NODE_RANK`` and ``WORLD_SIZE`` (and sets them in rank 0 itself once it has started them).

Here: :func:`current` (the :class:`Launch`: launcher, ranks, world size, token), its
:class:`LaunchPosition` (:func:`launch_position`: who does a job's or a node's one-time work),
the :func:`launch_token` naming this launch (markers of one-time work), the SLURM
:func:`allocation` of an ``srun`` step (nodes, tasks and GPUs per node) checked against the
config (:func:`resolve_devices`), and the :func:`requeue_command` of the job.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass

# Set by the process that makes up a token (no launcher gave one) for the processes it starts.
TOKEN_VAR = "IMAGENET_TRAINER_STAGE_TOKEN"

SRUN, TORCHRUN, LIGHTNING, NONE = "srun", "torchrun", "lightning", "none"


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not a rank (an integer)") from None


# -- who works: the position of this process in its job -------------------------------------------
@dataclass(frozen=True)
class LaunchPosition:
    """Where a process stands in its job: the first of the job (global rank 0) does the job's
    one-time work (the file list); the first of a node does its node's (staging); others wait."""

    first_in_job: bool = True
    first_on_node: bool = True
    described: str = "a single process"


_GLOBAL_VARS = ("RANK", "SLURM_PROCID")  # torchrun, srun
_NODE_VARS = ("NODE_RANK", "GROUP_RANK", "SLURM_NODEID")  # Lightning's launcher, torchrun, srun
_LOCAL_VARS = ("LOCAL_RANK", "SLURM_LOCALID")  # torchrun and Lightning's launcher, srun


def launch_position(env: Mapping[str, str] | None = None) -> LaunchPosition:
    """This process's :class:`LaunchPosition`. Rank 0 of the job is the process whose rank
    variables are all 0, or that has none (a single process; Lightning's launcher before it starts
    the others). Every variable is looked at, not the first found: under ``srun`` + torchrun
    ``SLURM_PROCID`` is the node and ``RANK`` the rank, and a process started by Lightning's
    launcher inside an sbatch script inherits ``SLURM_PROCID=0`` but has ``LOCAL_RANK`` > 0."""
    env = _env(env)
    found = {name: rank for name in (*_GLOBAL_VARS, *_NODE_VARS, *_LOCAL_VARS)
             if (rank := _int(env, name)) is not None}
    if not found:
        return LaunchPosition()
    first_on_node = all(found.get(name, 0) == 0 for name in _LOCAL_VARS)
    first_in_job = first_on_node and all(v == 0 for v in found.values())
    described = "the process with " + ", ".join(f"{k}={v}" for k, v in found.items())
    return LaunchPosition(first_in_job, first_on_node, described)


# -- the launcher and its ranks -------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """This process as its launcher started it; None where the launcher does not say."""

    launcher: str  # SRUN, TORCHRUN, LIGHTNING or NONE
    global_rank: int | None
    local_rank: int
    node_rank: int | None
    world_size: int | None
    token: str | None  # see launch_token
    position: LaunchPosition


def launcher(env: Mapping[str, str] | None = None) -> str:
    """Which launcher started this process: torchrun, Lightning's (``LOCAL_RANK`` without
    torchrun), srun (inside an ``srun`` step), else none."""
    env = _env(env)
    if env.get("TORCHELASTIC_RUN_ID", "").strip():
        return TORCHRUN
    if env.get("LOCAL_RANK", "").strip():
        return LIGHTNING
    if all(env.get(name) for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID")):
        return SRUN
    return NONE


def current(env: Mapping[str, str] | None = None) -> Launch:
    """The :class:`Launch` of this process."""
    env = _env(env)
    kind = launcher(env)
    if kind == TORCHRUN:
        ranks = (_int(env, "RANK"), _int(env, "LOCAL_RANK") or 0, _int(env, "GROUP_RANK"), _int(env, "WORLD_SIZE"))
    elif kind == SRUN:
        ranks = (_int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID") or 0, _int(env, "SLURM_NODEID"),
                 _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS"))
    elif kind == LIGHTNING:
        local, node = _int(env, "LOCAL_RANK") or 0, _int(env, "NODE_RANK") or 0
        # Node 0's ranks come first; elsewhere the global rank needs the devices per node.
        ranks = (local if node == 0 else None, local, node, _int(env, "WORLD_SIZE"))
    else:
        ranks = (0, 0, 0, 1)
    return Launch(kind, *ranks, token=launch_token(env), position=launch_position(env))


# -- the launch token -------------------------------------------------------------------------------
def launch_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token naming this launch, the same in every process of it, or None when there is none
    (yet): ``$IMAGENET_TRAINER_STAGE_TOKEN`` when set (:func:`make_launch_token`); else under SLURM
    ``slurm-<SLURM_JOB_ID>-<SLURM_RESTART_COUNT or 0>`` (a requeued job is a new launch), with
    ``-<SLURM_STEP_ID>`` when set (each srun of a job is one); under torchrun
    ``te-<TORCHELASTIC_RUN_ID>-<TORCHELASTIC_RESTART_COUNT or 0>`` (each elastic restart is a new
    launch), appended to the SLURM part when both apply."""
    env = _env(env)
    explicit = env.get(TOKEN_VAR, "").strip()
    if explicit:
        return _safe(explicit)
    parts = []
    job = env.get("SLURM_JOB_ID", "").strip()
    if job:
        parts += ["slurm", job, env.get("SLURM_RESTART_COUNT", "").strip() or "0"]
        step = env.get("SLURM_STEP_ID", "").strip()
        if step:
            parts.append(step)
    run = env.get("TORCHELASTIC_RUN_ID", "").strip()
    if run:
        parts += ["te", run, env.get("TORCHELASTIC_RESTART_COUNT", "").strip() or "0"]
    return _safe("-".join(parts)) if parts else None


def make_launch_token() -> str:
    """A new token for a launch no launcher named (Lightning's rank 0 before it starts the other
    local ranks), put into ``os.environ`` so that the processes this one starts inherit it."""
    token = _safe(f"pid-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    os.environ[TOKEN_VAR] = token
    return token


def _safe(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", token)[:120]


# -- SLURM: the allocation and the requeue command ------------------------------------------------
class SlurmConfigError(ValueError):
    """The config contradicts the SLURM allocation."""


@dataclass(frozen=True)
class Allocation:
    job_id: str
    num_nodes: int
    tasks_per_node: int
    restart_count: int
    gpus_per_node: int | None = None  # None: SLURM does not say (no GPUs asked for, or an old SLURM)


def _tasks_per_node(value: str) -> int:
    """``SLURM_TASKS_PER_NODE`` is like ``2(x3),1``; every node must run the same number."""
    counts = {int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", value)}
    if len(counts) != 1:
        raise SlurmConfigError(
            f"SLURM gives nodes different task counts (SLURM_TASKS_PER_NODE={value}); "
            f"submit with --ntasks-per-node=<GPUs per node> so every node runs the same number of ranks"
        )
    return counts.pop()


def _gpus_per_node(env: Mapping[str, str]) -> int | None:
    """``SLURM_GPUS_ON_NODE``, else the count of ``SLURM_GPUS_PER_NODE`` (``4`` or ``a100:4``)."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        m = re.fullmatch(r"(?:.*:)?(\d+)", env.get(name, "").strip())
        if m:
            return int(m.group(1))
    return None


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """Which run of the SLURM job this is: ``SLURM_RESTART_COUNT`` (0 for its first run, and
    outside SLURM)."""
    return int(_env(environ).get("SLURM_RESTART_COUNT", "").strip() or 0)


def allocation(environ: Mapping[str, str] | None = None) -> Allocation | None:
    """The allocation of the current ``srun`` step, or None when not running under ``srun``."""
    env = _env(environ)
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None  # not inside an srun step: a login node, salloc shell or the batch script
    tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1"
    return Allocation(
        job_id=env["SLURM_JOB_ID"],
        num_nodes=int(nodes),
        tasks_per_node=_tasks_per_node(tasks),
        restart_count=restart_count(env),
        gpus_per_node=_gpus_per_node(env),
    )


def resolve_devices(devices, num_nodes: int | None, alloc: Allocation | None) -> tuple[object, int]:
    """(devices per node, node count) for the Trainer, checked against the allocation."""
    if alloc is None:
        return devices, num_nodes or 1
    if devices != "auto" and int(devices) != alloc.tasks_per_node:
        raise SlurmConfigError(
            f"trainer.devices={devices} contradicts the SLURM allocation of {alloc.tasks_per_node} task(s) per node "
            f"(job {alloc.job_id}); one task drives one device: leave trainer.devices=auto, or submit with "
            f"--ntasks-per-node={devices}"
        )
    if num_nodes is not None and num_nodes != alloc.num_nodes:
        raise SlurmConfigError(
            f"trainer.num_nodes={num_nodes} contradicts the SLURM allocation of {alloc.num_nodes} node(s) "
            f"(job {alloc.job_id}); leave trainer.num_nodes unset, or submit with --nodes={num_nodes}"
        )
    return alloc.tasks_per_node, alloc.num_nodes


def job_group(environ: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job that groups this one's runs: the array's id for an array job, else the job
    id; None outside SLURM."""
    env = _env(environ)
    return env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID") or None


def requeue_command(environ: Mapping[str, str] | None = None) -> list[str]:
    """``scontrol requeue`` for this job (an array job's own task, not the whole array)."""
    env = _env(environ)
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else env["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return ["scontrol", "requeue", job]
