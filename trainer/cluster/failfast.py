"""Fail fast on a dead or hung rank: every rank of the job ends within ``run.hang_timeout_s``
(+ its dump) of one rank stopping, with an exit code that says why (trainer/cluster/exits.py) and a
record in ``RUN_DIR/failures.jsonl`` (trainer/cluster/failures.py), so that SLURM requeues the
job at once instead of it idling until the time limit.

Three mechanisms, as torchtitan does it:

- Process-group timeouts: ``run.pg_timeout_init_s`` (long: start-up, staging, compilation) until
  the first training step has run, then ``run.pg_timeout_s`` (short) on the default group and
  every group made with :func:`new_group` (the preemption flags' gloo group); back to the long one
  while a checkpoint is written (the other ranks wait for rank 0's write in a barrier). Under gloo a
  rank whose peer died or hung then leaves its collective with an error within ``pg_timeout_s``; the
  CLI (:func:`on_fit_error`) records it as "peer" and exits 12. Under NCCL with
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` (the sbatch script's) NCCL's own watchdog aborts the
  process instead (SIGABRT, exit 134, no Python runs): the SLURM supervisor reads that as a lost
  peer too, and never excludes its node (trainer/cluster/supervise.py).
- A step-progress watchdog (trainer/cluster/watchdog.py) on every rank when
  ``run.hang_timeout_s`` is set: training steps, validation batches and checkpoint saves are
  progress; none for that long dumps every thread's stack and exits 10. It also catches a rank
  blocked in a collective that never times out.
- Fault injection (trainer/cluster/faults.py, ``IMAGENET_TRAINER_FAULT``) of ``crash`` and
  ``hang`` at a training step's start, for the tests.

``crash`` is ``SIGSEGV`` sent to the process itself: like a real segfault (or the OOM killer's
SIGKILL) no Python runs after it, no exception is raised, no record is written by that rank
(``faulthandler`` prints its stack to the job's log), and its sockets close, which is what its peers
see. ``hang`` sleeps forever in :func:`_injected_hang`, the frame a hang dump must show.
"""
from __future__ import annotations

import datetime as _dt
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import pytorch_lightning as pl

from trainer.cluster import exits, failures, faults
from trainer.cluster.watchdog import Watchdog

EXIT_GRACE_S = 60  # after a recorded failure, the most a rank may take to exit before it is ended
PEER_GRACE_S = 10  # a lost peer's wait before its own exit, so that the failed rank's exit is reported first

_timeout: _dt.timedelta | None = None  # the timeout new groups get (None: torch's default)
_groups: list = []  # the groups made by new_group, shortened with the default one
_watchdog: Watchdog | None = None  # this process' running watchdog, for the CLI's exit


def new_group(**kwargs):
    """``torch.distributed.new_group`` with the fit's current process-group timeout, shortened
    after the first step with the default group's."""
    import torch.distributed as dist

    if _timeout is None:  # no FailFast in this fit: torch's own timeout, nothing to shorten
        return dist.new_group(**kwargs)
    kwargs.setdefault("timeout", _timeout)
    group = dist.new_group(**kwargs)
    _groups.append(group)
    return group


def set_pg_timeout(seconds: float) -> None:
    """The timeout of the default process group and of every group from :func:`new_group`, for
    their next collectives (``torch.distributed.set_timeout``; ``_set_pg_timeout`` before it)."""
    global _timeout
    import torch.distributed as dist

    _timeout = _dt.timedelta(seconds=seconds)
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    if dist.is_available() and dist.is_initialized():
        setter(_timeout)
        for group in _groups:
            setter(_timeout, group)


def current_watchdog() -> Watchdog | None:
    return _watchdog


def _injected_hang() -> None:
    """The ``hang`` fault: this rank stops making progress (its main thread sleeps for ever)."""
    threading.Event().wait()


def _injected_crash() -> None:
    """The ``crash`` fault: a segfault, as far as anyone can tell."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSEGV)


class FailFast(pl.Callback):
    """Process-group timeouts, the progress watchdog and fault injection for one fit (see the
    module doc). ``hang_timeout_s`` None: no watchdog."""

    def __init__(self, run_dir: Path | str, *, pg_timeout_init_s: float, pg_timeout_s: float,
                 hang_timeout_s: float | None) -> None:
        self.run_dir = Path(run_dir)
        self.pg_timeout_init_s, self.pg_timeout_s, self.hang_timeout_s = pg_timeout_init_s, pg_timeout_s, hang_timeout_s
        self._faults = os.environ.get(faults.ENV) or None  # read once: nothing per step when unset
        if self._faults:
            faults.parse(self._faults)  # a bad value fails before the fit starts
        self._first_step_done = False
        self.watchdog: Watchdog | None = None
        global _timeout, _groups
        _timeout, _groups = _dt.timedelta(seconds=pg_timeout_init_s), []

    # --- the watchdog ---------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage) -> None:
        global _watchdog
        if stage == "fit" and trainer.world_size > 1:
            # A fit again in this process (the guard's rollback) finds the process group of the
            # last one, shortened: Lightning does not make it anew, so start-up's timeout goes back.
            set_pg_timeout(self.pg_timeout_init_s)
        if stage != "fit" or self.hang_timeout_s is None or self.watchdog is not None:
            return
        if not faulthandler.is_enabled():
            faulthandler.enable()  # a segfault's stack goes to the job's log
        rank, restart = trainer.global_rank, faults.restart_count()
        self.watchdog = Watchdog(self.hang_timeout_s, failures.dump_path(self.run_dir, exits.HUNG.cause, rank, restart),
                                 first_timeout_s=max(self.hang_timeout_s, self.pg_timeout_init_s),
                                 on_hang=self._on_hang).start()
        _watchdog = self.watchdog

    def _on_hang(self, dump: Path, idle_s: float) -> None:
        run = failures.active_wandb_run()
        failures.record(self.run_dir, exits.HUNG, dump=dump, detail=f"no training progress for {idle_s:.0f} s",
                        wandb_run=run)
        if run is not None:  # rank 0: close the W&B run so the summary reaches disk, but never wait long
            done = threading.Thread(target=lambda: run.finish(exit_code=exits.HUNG.code), daemon=True)
            done.start()
            done.join(30)

    def _beat(self, *args, **kwargs) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()

    on_train_epoch_start = on_validation_start = on_validation_batch_end = _beat
    on_sanity_check_end = on_train_start = _beat

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._beat()
        if self._first_step_done and trainer.world_size > 1:
            # The other ranks wait in a barrier while rank 0 writes: a slow filesystem must not
            # end them as if rank 0 were lost. Shortened again at the next step's start.
            set_pg_timeout(self.pg_timeout_init_s)
            self._timeout_raised = True

    _timeout_raised = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()
        if self._timeout_raised:
            self._timeout_raised = False
            set_pg_timeout(self.pg_timeout_s)
        if self._faults:
            rank, step = trainer.global_rank, trainer.global_step
            if faults.due("crash", rank, step):
                print(f"imagenet-trainer: injected crash on rank {rank} at step {step}", file=sys.stderr, flush=True)
                _injected_crash()
            if faults.due("hang", rank, step):
                print(f"imagenet-trainer: injected hang on rank {rank} at step {step}", file=sys.stderr, flush=True)
                _injected_hang()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()
        if not self._first_step_done:
            self._first_step_done = True
            # Start-up is over: from now a lost peer ends a collective within pg_timeout_s.
            if trainer.world_size > 1:
                set_pg_timeout(self.pg_timeout_s)
            if self.watchdog is not None:
                self.watchdog.set_timeout(self.hang_timeout_s)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._stop()

    # --- failures -------------------------------------------------------------------------------
    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Record a failure while the W&B run is still open (Lightning finishes it next); the
        watchdog then only bounds the way out. Control flow (a preemption, the guard's rollback,
        which fits again with a new FailFast) and config errors stop it instead."""
        if not isinstance(exception, Exception) or _is_control_flow(exception) or _is_user_error(exception):
            self._stop()
            return
        exit = record_failure(self.run_dir, exception, rank=trainer.global_rank)
        if self.watchdog is not None:
            self.watchdog.exit_within(exit.code, EXIT_GRACE_S)

    def _stop(self) -> None:
        global _watchdog
        if self.watchdog is not None:
            self.watchdog.stop()
            if _watchdog is self.watchdog:
                _watchdog = None
            self.watchdog = None


def _is_control_flow(err: BaseException) -> bool:
    """A preemption (trainer/cluster/preemption.py) or the NaN guard's rollback (guard.py): not failures."""
    from trainer.cluster.preemption import Preempted

    if isinstance(err, Preempted):
        return True
    try:
        from trainer.cluster.guard import Rollback
    except ImportError:
        return False
    return isinstance(err, Rollback)


def _is_user_error(err: BaseException) -> bool:
    """Config and data errors: the CLI reports them as exit 2 (no failure: a retry cannot help)."""
    from trainer.config import ConfigError

    if isinstance(err, (ConfigError, ValueError)):
        return True
    try:
        from data_pipelines.layout import DataLayoutError
    except ImportError:
        return False
    return isinstance(err, DataLayoutError)


def record_failure(run_dir: Path | str, err: BaseException, *, rank: int | None = None) -> exits.Exit:
    """Record ``err`` (once: a second call for the same exception only returns its exit) with a
    dump of its traceback and every thread's stack; its exit."""
    exit = failures.classify(err)
    if getattr(err, "_imagenet_trainer_recorded", False):
        return exit
    rank = failures.global_rank() if rank is None else rank
    dump = failures.dump_path(run_dir, exit.cause, rank, faults.restart_count())
    try:
        failures.write_exception_dump(dump, err)
    except OSError:
        dump = None
    failures.record(run_dir, exit, rank=rank, dump=dump, detail=f"{type(err).__name__}: {err}")
    try:
        err._imagenet_trainer_recorded = True
    except AttributeError:
        pass
    return exit


def on_fit_error(run_dir: Path | str, err: BaseException) -> exits.Exit:
    """For the CLI, when ``fit`` raised ``err`` (not a config or data error): record it (unless
    the callback did), print its traceback (a crash's is printed by the interpreter as it ends;
    an error with an exit code of its own, such as Diverged, prints its message), and make sure the
    process ends within EXIT_GRACE_S; its exit (CRASH, PEER, or the error's own)."""
    exit = record_failure(run_dir, err)
    if exit is exits.PEER:
        traceback.print_exception(type(err), err, err.__traceback__)
    elif exit is not exits.CRASH:
        print(f"imagenet-trainer: {err}", file=sys.stderr)
    if exit is not exits.CRASH:
        print(f"imagenet-trainer: {exit.meaning} (exit {exit.code}); see {Path(run_dir) / failures.FILE}",
              file=sys.stderr, flush=True)
    if exit is exits.PEER:
        # A lost peer leaves last. srun --kill-on-bad-exit (and torchrun) report the first task to
        # exit badly and kill the rest: that must be the rank that failed (11 excludes its node, 1 is a
        # crash), not this 12, which the failed rank's peers may reach as fast as it reaches its own
        # exit (a failed health check: every rank learns it from one all-reduce). Once the failed rank
        # has exited, srun ends this wait at once; the record above is already written.
        time.sleep(PEER_GRACE_S)
    # Exit may block (a process group's teardown waiting for a stopped peer, W&B's upload): end the
    # process with this code if it is still alive EXIT_GRACE_S from now, watchdog on or off.
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog(EXIT_GRACE_S, failures.dump_path(run_dir, exit.cause, 0, 0)).start()
    _watchdog.exit_within(exit.code, EXIT_GRACE_S)
    return exit
