"""Checkpoint and requeue on SLURM's warning signal, every rank stopping at the same step.

SLURM sends SIGUSR1 to every task of a job ``N`` seconds before its time limit
(``sbatch --signal=USR1@N``) or when an administrator asks (``scancel --signal=USR1``).
Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint inside
the signal handler, wherever each rank happens to be when its signal lands; saving ends in a
barrier, so a rank in that barrier and a rank in DDP's gradient all-reduce wait for each other
forever. That hung our SLURM test on CI.

Here the handler only sets a flag. At the start of each training step every rank adds its flag
to an all-reduce (max) over a CPU (gloo) group. The all-reduce is started without waiting and read
at the start of the next step, so no step waits for it and the GPU's queue never drains; every rank
reads the same answer at the same step. When it says "a rank was signalled", every rank takes part
in writing ``RUN_DIR/hpc_ckpt_N.ckpt`` at that step boundary, rank 0 runs ``scontrol requeue``,
and every rank raises :class:`Preempted`. The checkpoint is written at most two steps after the
first signal lands.

At a step's start the previous step is complete and this one has not begun, so the checkpoint
resumes at this step exactly (``ImageNetDataModule.state_dict`` counts completed batches).
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Mapping, Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_signalled = threading.Event()


def _on_signal(signum, frame) -> None:
    # Nothing else: this runs between two bytecodes of whatever the rank is doing.
    _signalled.set()


def listen(signum: int = signal.SIGUSR1) -> None:
    """Catch ``signum`` from now on (the default action of SIGUSR1 would end the process).
    Only the main thread may install handlers; elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signum) is not _on_signal:
        signal.signal(signum, _on_signal)


def signalled() -> bool:
    """Whether this process has received the signal."""
    return _signalled.is_set()


def requeue_command(environ: Mapping[str, str] | None = None) -> list[str]:
    """``scontrol requeue`` for this job (an array job's own task, not the whole array)."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else env["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return ["scontrol", "requeue", job]


def next_hpc_path(run_dir: Path) -> Path:
    """``run_dir/hpc_ckpt_N.ckpt`` with N one above the newest (Lightning's naming)."""
    numbers = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class Preempted(Exception):
    """Raised on every rank once the preemption checkpoint is written (and the job requeued)."""

    def __init__(self, checkpoint: Path, requeued: bool, reason: str = "") -> None:
        self.checkpoint, self.requeued, self.reason = checkpoint, requeued, reason
        then = ("the job is requeued and resumes from it" if requeued
                else f"the job was not requeued ({reason}); resubmit with run.dir={checkpoint.parent} to resume")
        super().__init__(f"preempted: wrote {checkpoint}; {then}")


class RequeueOnSignal(pl.Callback):
    """Checkpoint at a step boundary agreed by all ranks, requeue, stop (see the module doc).

    ``requeue``: the command rank 0 runs after the checkpoint (``scontrol requeue JOBID``), or
    None to only checkpoint and stop.
    """

    def __init__(self, run_dir: Path, requeue: Sequence[str] | None, signum: int = signal.SIGUSR1) -> None:
        self.run_dir = Path(run_dir)
        self.requeue = list(requeue) if requeue else None
        self.signum = signum
        self._group = None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        if stage != "fit":
            return
        listen(self.signum)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # A CPU group: the flag's all-reduce never touches the GPU stream (no host sync),
            # and it is a collective of its own, apart from DDP's gradient all-reduces.
            self._group = dist.new_group(backend="gloo")

    def _any_rank_signalled(self) -> bool:
        mine = signalled()
        if self._group is None:
            return mine
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()  # started a whole step ago: long done
            agreed = bool(flag.numpy()[0])
            self._pending = None
        if not agreed:
            flag = torch.tensor([int(mine)], dtype=torch.int32)
            self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return agreed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._any_rank_signalled():
            return
        # The same path on every rank (rank 0's is the one written); decided before anyone writes.
        path = next_hpc_path(self.run_dir)
        if self._group is not None:
            box = [str(path)]
            dist.broadcast_object_list(box, src=0, group=self._group)
            path = Path(box[0])
        for logger in trainer.loggers:
            mark = getattr(logger, "mark_preempting", None)
            if callable(mark):
                mark()
        trainer.save_checkpoint(path)  # every rank takes part; ends in a barrier
        requeued, reason = False, "no requeue command"
        if self.requeue is not None:
            if trainer.is_global_zero:
                requeued, reason = self._run_requeue()
            if self._group is not None:
                box = [(requeued, reason)]
                dist.broadcast_object_list(box, src=0, group=self._group)
                requeued, reason = box[0]
        if trainer.is_global_zero:
            log.info("preempted at epoch %d, step %d: wrote %s; %s", trainer.current_epoch, trainer.global_step,
                     path, "requeued the job" if requeued else f"did not requeue ({reason})")
        raise Preempted(path, requeued, reason)

    def _run_requeue(self) -> tuple[bool, str]:
        try:
            done = subprocess.run(self.requeue, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            return False, f"{' '.join(self.requeue)}: {err}"
        if done.returncode != 0:
            return False, f"{' '.join(self.requeue)} exited {done.returncode}: {done.stderr.strip()[-500:]}"
        return True, ""

    def on_train_end(self, trainer, pl_module) -> None:
        # Every rank started the same number of flag all-reduces; finish the last one.
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def teardown(self, trainer, pl_module, stage) -> None:
        self._pending = None
        self._group = None  # destroyed with the default group
