"""Checkpoint on SLURM's signals, every rank stopping at the same step.

SLURM sends SIGUSR1 to every task of a job ``N`` seconds before its time limit
(``sbatch --signal=USR1@N``) or when an administrator asks (``scancel --signal=USR1``); it sends
SIGTERM when it stops a job (``scancel``, the time limit, preemption), and SIGKILL ``KillWait``
(or the partition's ``GraceTime``) seconds later.

Lightning handles both inside the signal handler, wherever each rank happens to be when its
signal lands: on USR1 (``SLURMEnvironment(auto_requeue=True)``) it saves a checkpoint, which ends
in a barrier; on SIGTERM it broadcasts a flag. A rank in that collective and a rank in DDP's
gradient all-reduce wait for each other forever; this hung our SLURM test on CI. Lightning also
broadcasts its SIGTERM flag from the GPU and reads it back at every DDP step, which makes the host
wait for the GPU once a step.

Here the handler only records the signal. At the start of each training step every rank adds
what it received to an all-reduce (max) over a CPU (gloo) group. The all-reduce is started without
waiting and read at the start of the next step, so no step waits for it and the GPU's queue never
drains; every rank reads the same answer at the same step. When a rank was signalled, every rank
takes part in writing ``RUN_DIR/hpc_ckpt_N.ckpt`` at that step boundary; on USR1 rank 0 then runs
``scontrol requeue``; and every rank raises :class:`Preempted`. The checkpoint is written at most
two steps after the first signal lands. At a step's start the previous step is complete and this
one has not begun, so the checkpoint resumes at this step exactly. Rank 0 then deletes all but the
newest ``keep`` ``hpc_ckpt`` files, once the new one loads (:func:`prune_hpc_checkpoints`).

Signals are acted on between training steps only: one that lands during a validation pass waits
for the next training step.
"""
from __future__ import annotations

import logging
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from data_pipelines.launch import requeue_command  # noqa: F401  (the job's requeue: the launch layer's)

log = logging.getLogger(__name__)

# The signals we act on, in the order of the flags all-reduced between ranks.
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: set[int] = set()  # received by this process and not yet acted on


def _on_signal(signum, frame) -> None:
    # Nothing else: this runs between two bytecodes of whatever the rank is doing.
    _received.add(signum)


def listen(signums: Sequence[int] = (signal.SIGUSR1,)) -> None:
    """Record these signals from now on instead of their default action (for SIGUSR1: ending the
    process). Only the main thread may install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in signums:
        if signal.getsignal(signum) is not _on_signal:
            signal.signal(signum, _on_signal)


def hpc_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(N, path) of each ``run_dir/hpc_ckpt_N.ckpt``, oldest (lowest N) first."""
    return sorted((int(m.group(1)), p) for p in run_dir.glob("hpc_ckpt_*.ckpt")
                  if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name)))


def next_hpc_path(run_dir: Path) -> Path:
    """``run_dir/hpc_ckpt_N.ckpt`` with N one above the newest (Lightning's naming)."""
    numbered = hpc_checkpoints(run_dir)
    return run_dir / f"hpc_ckpt_{numbered[-1][0] + 1 if numbered else 1}.ckpt"


def checkpoint_step(path: Path) -> int | None:
    """``path``'s global step, or None when it does not load (``weights_only``, on the CPU, memory
    mapped) as a checkpoint with a state_dict: truncated, corrupt or unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if "state_dict" not in ckpt:
            return None
        return int(ckpt.get("global_step", 0))
    except Exception:  # noqa: BLE001 - truncated, corrupt or unreadable: not a checkpoint to rely on
        return None


def loadable(path: Path) -> bool:
    """Whether ``path`` loads as a checkpoint with a state_dict (:func:`checkpoint_step`)."""
    return checkpoint_step(path) is not None


def prune_hpc_checkpoints(run_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` ``hpc_ckpt_N.ckpt`` in ``run_dir`` (None: keep every one);
    the deleted paths.

    Only once the newest loads: one that does not (a full disk, a node lost while writing) deletes
    nothing, so the last complete checkpoint is never the one removed. A file that cannot be
    deleted is logged and left: pruning must never stop a preempted job from requeueing.
    """
    paths = [p for _, p in hpc_checkpoints(Path(run_dir))]
    if keep is None or len(paths) <= keep:
        return []
    if not loadable(paths[-1]):
        log.warning("%s does not load as a checkpoint; keeping the older hpc_ckpt files", paths[-1])
        return []
    deleted = []
    for path in paths[:-keep]:
        try:
            path.unlink()
            deleted.append(path)
        except OSError as err:
            log.warning("could not delete the old checkpoint %s: %s", path, err)
    return deleted


class Preempted(Exception):
    """Raised on every rank once the checkpoint is written (and, on USR1, the job requeued)."""

    def __init__(self, checkpoint: Path, signum: int, requeued: bool, reason: str = "") -> None:
        self.checkpoint, self.signum, self.requeued, self.reason = checkpoint, signum, requeued, reason
        name = signal.Signals(signum).name
        if requeued:
            then = "the job is requeued and resumes from it"
        elif signum == signal.SIGTERM:
            then = (f"resubmit with run.dir={checkpoint.parent} to resume (a job that SLURM requeues "
                    f"after preempting it resumes from it by itself)")
        else:
            then = f"the job was not requeued ({reason}); resubmit with run.dir={checkpoint.parent} to resume"
        super().__init__(f"stopped by {name}: wrote {checkpoint}; {then}")

    @property
    def exit_code(self) -> int:
        """0 when requeued; 128 + 15 (as if killed) on SIGTERM; 3 when a requeue failed."""
        if self.requeued:
            return 0
        return 128 + signal.SIGTERM if self.signum == signal.SIGTERM else 3


def _no_sigterm_broadcast() -> None:
    """Replaces Lightning's per-step SIGTERM broadcast: RequeueOnSignal handles SIGTERM."""


def align_log_step(trainer) -> None:
    """Put the loggers' step back on the global step after a resume from one of our checkpoints.

    Lightning logs with ``_batches_that_stepped``, equal to the global step at every batch start
    (one optimizer, automatic optimisation), and on restoring a mid-epoch checkpoint it adds one,
    as if the checkpoint had been written at a step's end, before that count moved. Ours are written
    at a step's start, after it moved: without this, a resumed run logs no step G and every later
    one at G+1 (metrics.csv and W&B would skip a step). Call at the first batch's start.
    """
    loop = trainer.fit_loop.epoch_loop
    if loop._batches_that_stepped == trainer.global_step + 1:
        loop._batches_that_stepped = trainer.global_step


class RequeueOnSignal(pl.Callback):
    """Checkpoint at a step boundary agreed by all ranks on SIGUSR1 or SIGTERM; on SIGUSR1 also
    requeue; then stop (see the module doc).

    ``requeue``: the command rank 0 runs after the checkpoint on SIGUSR1 (``scontrol requeue
    JOBID`` under SLURM), or None to only checkpoint and stop. ``keep``: how many
    ``hpc_ckpt_N.ckpt`` to keep once a newer one is written (:func:`prune_hpc_checkpoints`; None: all).
    """

    def __init__(self, run_dir: Path, requeue: Sequence[str] | None, keep: int | None = 2) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
        self.run_dir = Path(run_dir)
        self.requeue = list(requeue) if requeue else None
        self.keep = keep
        self._group = None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None
        self._first_batch = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._first_batch = True
        # Here, after Lightning installed its handlers (Trainer._run), to replace them; its
        # teardown puts back the ones from before the fit.
        listen(SIGNALS)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # A CPU group: the flags' all-reduce never touches the GPU stream (no host sync),
            # and it is a collective of its own, apart from DDP's gradient all-reduces.
            # Its timeout follows the default group's (trainer/cluster/failfast.py): long at
            # start-up, run.pg_timeout_s once the first step has run.
            from trainer.cluster.failfast import new_group

            self._group = new_group(backend="gloo")
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_broadcast_sigterm_tensor"):  # Lightning >= 2.6; every rank alike
                loop._broadcast_sigterm_tensor = _no_sigterm_broadcast

    def _received_anywhere(self) -> list[bool]:
        """For each of SIGNALS: whether any rank received it (as of one step ago under DDP)."""
        mine = [s in _received for s in SIGNALS]
        if self._group is None:
            return mine
        agreed = [False] * len(SIGNALS)
        if self._pending is not None:
            work, flags = self._pending
            work.wait()  # started a whole step ago: long done
            agreed = [bool(v) for v in flags.numpy()]
            self._pending = None
        if not any(agreed):
            flags = torch.tensor(mine, dtype=torch.int32)
            self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flags)
        return agreed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._first_batch:
            self._first_batch = False
            align_log_step(trainer)
        received = self._received_anywhere()
        if not any(received):
            return
        signum = SIGNALS[received.index(True)]  # USR1 first: it asks for a requeue
        _received.clear()
        # The same path on every rank (rank 0's is the one written); decided before anyone writes.
        path = self._broadcast(next_hpc_path(self.run_dir))
        for logger in trainer.loggers:
            mark = getattr(logger, "mark_preempting", None)
            if callable(mark):
                mark()
        trainer.save_checkpoint(path)  # every rank takes part; ends in a barrier
        requeued, reason = False, "no requeue command"
        if signum == signal.SIGUSR1 and self.requeue is not None:
            if trainer.is_global_zero:
                requeued, reason = self._run_requeue()
            requeued, reason = self._broadcast((requeued, reason))
        if trainer.is_global_zero:
            # After save_checkpoint's barrier (``path`` is complete on disk), and after the requeue:
            # SLURM's grace time is short, and the requeue is what must not be missed.
            prune_hpc_checkpoints(self.run_dir, self.keep)
            log.info("%s at epoch %d, step %d: wrote %s%s", signal.Signals(signum).name, trainer.current_epoch,
                     trainer.global_step, path, "; requeued the job" if requeued else "")
        raise Preempted(path, signum, requeued, reason)

    def _broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        if self._group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

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
