"""The record of a failed rank: one JSON line in ``RUN_DIR/failures.jsonl``, a dump beside it in
``RUN_DIR/failures/``, and the W&B run's summary (plus an alert when online).

Why a file of its own: a job that dies leaves a log of thousands of lines per rank, and a requeued
job overwrites nothing of the one before it here. One line per failed rank and restart says which
rank failed first and why (the exit codes of trainer/cluster/exits.py), and names the file that
holds its stacks or traceback; ``failures.jsonl`` over several requeues tells a bad node from a
bad run.

Several ranks (and nodes) append to the same file at the same moment: each line is written by one
``os.write`` on an ``O_APPEND`` descriptor, under an exclusive ``flock`` where the filesystem has
one, and kept under PIPE_BUF (4096 bytes) by shortening its detail, so lines never interleave.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping

from trainer.cluster import exits
from trainer.cluster.faults import restart_count

FILE = "failures.jsonl"
DUMPS = "failures"
MAX_LINE = 4000  # < PIPE_BUF (4096): one write, never interleaved with another rank's

# A process group that timed out or lost a peer. gloo raises RuntimeError ("Timed out waiting
# ...ms", "Connection closed by peer", "Connection reset by peer"); NCCL raises DistBackendError
# (and, with async error handling, aborts the process: SIGABRT, a "crash" by its exit code).
_PEER_WORDS = re.compile(r"timed? ?out|timeout|connection (closed|reset) by peer|broken pipe|econnreset|"
                         r"communicator was aborted|socket (closed|error)", re.I)


def classify(err: BaseException) -> exits.Exit:
    """The exit of a fit that raised ``err``: the table's entry for its ``exit_code`` when it has
    one (trainer/cluster/guard.py's Diverged: 13), PEER for a process group that timed out or broke
    (another rank died or hung), CRASH for anything else."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int) and code in exits.BY_CODE and code != exits.OK.code:
        return exits.BY_CODE[code]
    try:
        from torch.distributed import DistBackendError
    except ImportError:  # a torch without it
        DistBackendError = ()  # noqa: N806
    if DistBackendError and isinstance(err, DistBackendError):
        return exits.PEER
    if isinstance(err, RuntimeError) and _PEER_WORDS.search(str(err)):
        return exits.PEER
    return exits.CRASH


def global_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process' global rank: Lightning's once the strategy set it, else srun's or torchrun's."""
    try:
        from lightning_fabric.utilities.rank_zero import rank_zero_only

        rank = getattr(rank_zero_only, "rank", None)
        if rank is not None:
            return int(rank)
    except ImportError:
        pass
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if env.get(var):
            return int(env[var])
    return 0


def dump_path(run_dir: Path | str, cause: str, rank: int, restart: int) -> Path:
    """``RUN_DIR/failures/<cause>-rank<R>-restart<N>.txt``."""
    return Path(run_dir) / DUMPS / f"{cause}-rank{rank}-restart{restart}.txt"


def record_line(exit: exits.Exit, *, rank: int, dump: Path | str | None = None, detail: str = "",
                env: Mapping[str, str] = os.environ, now: _dt.datetime | None = None) -> str:
    """The JSON line (ending in a newline, under MAX_LINE bytes) recording that ``rank`` failed."""
    record = {
        "time": (now or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="seconds"),
        "job": env.get("SLURM_JOB_ID"),
        "restart": restart_count(env),
        "host": socket.gethostname(),
        "rank": rank,
        "pid": os.getpid(),
        "exit_code": exit.code,
        "cause": exit.cause,
        "retry": exit.retry,
        "dump": None if dump is None else str(dump),
        "detail": "",
    }
    room = MAX_LINE - len(json.dumps(record, ensure_ascii=True).encode()) - 1
    detail = " ".join(detail.split())
    while detail and len(json.dumps(detail, ensure_ascii=True)) - 2 > room:
        detail = detail[: max(len(detail) - max(len(detail) // 8, 16), 0)]
    record["detail"] = detail
    return json.dumps(record, ensure_ascii=True) + "\n"


def append(run_dir: Path | str, line: str) -> Path:
    """Append ``line`` to ``RUN_DIR/failures.jsonl``: one write on an O_APPEND fd, under flock."""
    path = Path(run_dir) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # a filesystem without flock (some Lustre mounts): O_APPEND alone
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        os.write(fd, data)
    finally:
        os.close(fd)  # releases the lock
    return path


def record(run_dir: Path | str, exit: exits.Exit, *, rank: int | None = None, dump: Path | str | None = None,
           detail: str = "", wandb_run: Any = None) -> dict:
    """Append this rank's failure to ``RUN_DIR/failures.jsonl`` and to the W&B run (``wandb_run``,
    else the process' active run, if any: rank 0's); the record. Never raises for W&B."""
    line = record_line(exit, rank=global_rank() if rank is None else rank, dump=dump, detail=detail)
    append(run_dir, line)
    rec = json.loads(line)
    to_wandb(rec, wandb_run)
    return rec


def read(run_dir: Path | str) -> list[dict]:
    """Every record of ``RUN_DIR/failures.jsonl``, oldest first ([] when none)."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def active_wandb_run() -> Any:
    """The process' W&B run when wandb is already imported and a run is open, else None."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def to_wandb(rec: dict, run: Any = None) -> bool:
    """Put ``rec`` in the W&B run's summary as ``failure/*`` and, online, raise an alert; whether
    a run took it. W&B trouble is printed, never raised: the exit code must not change."""
    run = run if run is not None else active_wandb_run()
    if run is None or not hasattr(run, "summary"):
        return False
    try:
        run.summary.update({f"failure/{k}": v for k, v in rec.items() if v is not None})
        if not getattr(run, "offline", True):  # an alert needs the server
            import wandb

            run.alert(title=f"rank {rec['rank']} failed: {rec['cause']} (exit {rec['exit_code']})",
                      text=f"job {rec['job']} restart {rec['restart']} on {rec['host']}: {rec['detail'][:500]} "
                           f"(dump: {rec['dump']})", level=wandb.AlertLevel.ERROR)
        return True
    except Exception as err:  # noqa: BLE001 - a record must never change how the rank ends
        print(f"imagenet-trainer: could not record the failure in W&B: {err}", file=sys.stderr)
        return False


def write_exception_dump(path: Path, err: BaseException) -> Path:
    """The traceback of ``err`` and every thread's stack, in ``path`` (the dump of a crash or a
    lost peer: the job's log holds the same traceback among every other rank's lines)."""
    import faulthandler

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        f.write("\nEvery thread's stack at the time of the record:\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
    return path
