"""The exit codes of ``imagenet-trainer fit``, in one table: what each means, and whether a retry
(a requeue of the SLURM job) can help. docs/clusters.md shows this table; the sbatch script and
the failure records read it from here.

A retry helps when the cause was the machine (a crash, a hang, a bad node, a lost peer); it cannot
fix the config, the data or a diverged run, so those stop the job with the cause in its last line.
"""
from __future__ import annotations

import dataclasses
import signal


@dataclasses.dataclass(frozen=True)
class Exit:
    code: int
    cause: str
    retry: bool
    meaning: str


OK = Exit(0, "ok", False, "finished, or preempted by SIGUSR1 and requeued")
CRASH = Exit(1, "crash", True, "an unexpected error on this rank (its traceback is in the job's log)")
CONFIG = Exit(2, "config", False, "a config or data error, named on the last line; fix it and resubmit")
REQUEUE_FAILED = Exit(3, "requeue-failed", False, "preempted and checkpointed, but the requeue failed; resubmit")
HUNG = Exit(10, "hang", True, "no training progress for run.hang_timeout_s: every thread's stack is in RUN_DIR/failures/")
NODE = Exit(11, "node", True, "the health check before the first step failed on this host")
PEER = Exit(12, "peer", True, "another rank died or hung: the process group timed out or broke")
DIVERGED = Exit(13, "diverged", False, "non-finite or spiking losses after guard.max_rollbacks rollbacks")
TERMINATED = Exit(128 + signal.SIGTERM, "terminated", False,
                  "stopped by SIGTERM (scancel, time limit, preemption) after a checkpoint; SLURM decides on a requeue")

TABLE: tuple[Exit, ...] = (OK, CRASH, CONFIG, REQUEUE_FAILED, HUNG, NODE, PEER, DIVERGED, TERMINATED)
BY_CODE = {e.code: e for e in TABLE}


def describe(code: int) -> Exit:
    """The table's entry for ``code``; a code not in it is a crash (a signal: 128 + its number)."""
    if code in BY_CODE:
        return BY_CODE[code]
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return Exit(code, "crash", True, f"killed by {name}")
    return Exit(code, "crash", True, f"exited {code}")
