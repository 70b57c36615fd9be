"""A step-progress watchdog: a thread that ends the process when the training loop stops moving.

Why a thread: a rank stuck in its own code (a deadlocked data loader, a GPU that never returns, a
fault injected with ``hang``) or in a collective whose peer is gone never reaches another line of
Python on its main thread. Something else must notice, say where each thread is, and end the
process so that SLURM can requeue the job instead of burning its allocation until the time limit.

Cost on the loop: :meth:`Watchdog.beat` stores one float (``time.monotonic()``); no lock, no
wake-up, no GPU read. The thread sleeps until the deadline of the last beat it saw, and only then
looks again: with steady progress it wakes once per ``timeout_s``, not once per step.

When ``timeout_s`` passes without a beat it writes every thread's Python stack
(``faulthandler.dump_traceback``) to its dump file, calls ``on_hang`` (the failure record), and
exits with the "hung" code through ``exit`` (``os._exit``: the main thread cannot be asked to
unwind). :meth:`Watchdog.exit_within` turns it into a plain deadline for a process that is already
ending (after a recorded failure) but might block on its way out.
"""
from __future__ import annotations

import faulthandler
import os
import threading
import time
from pathlib import Path
from typing import Callable

from trainer.cluster import exits


class Watchdog:
    """Ends the process ``timeout_s`` seconds after the last :meth:`beat` (from :meth:`start`).

    ``first_timeout_s``: the allowance before the first :meth:`set_timeout` call (start-up, the
    first step's compilation), default ``timeout_s``. ``dump_to``: where the stacks go.
    ``on_hang(dump_path, idle_s)``: called after the dump, before the exit (errors are printed).
    ``exit``: ``os._exit``; a test passes its own to watch it fire in-process.
    """

    def __init__(self, timeout_s: float, dump_to: Path | str, *, first_timeout_s: float | None = None,
                 on_hang: Callable[[Path, float], None] | None = None, exit: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be positive")
        self.timeout_s = float(first_timeout_s or timeout_s)
        self.dump_to = Path(dump_to)
        self.on_hang = on_hang
        self._exit = exit
        self._clock = clock
        self._last = clock()
        self._final_code: int | None = None  # exit_within: leave with this code, no dump
        self._wake = threading.Event()
        self._stopped = False
        self.fired: str | None = None  # "hang" or "exit" once it acted
        self._thread = threading.Thread(target=self._run, name="imagenet-trainer-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._last = self._clock()
        self._thread.start()
        return self

    def beat(self) -> None:
        """Progress: one store, O(1), safe from any thread."""
        self._last = self._clock()

    def set_timeout(self, timeout_s: float) -> None:
        """From now the allowance between beats is ``timeout_s`` (counted from the last beat)."""
        self.timeout_s = float(timeout_s)
        self._wake.set()

    def exit_within(self, code: int, grace_s: float) -> None:
        """The process is ending with ``code``: if it is still alive ``grace_s`` from now (stuck in
        a process group's teardown, a loader's workers, W&B's upload), exit with ``code`` then."""
        self._final_code = code
        self.timeout_s = float(grace_s)
        self.beat()
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopped:
            idle = self._clock() - self._last
            if idle >= self.timeout_s:
                self._fire(idle)
                return
            self._wake.wait(self.timeout_s - idle)
            self._wake.clear()

    def _fire(self, idle: float) -> None:
        if self._final_code is not None:
            self.fired = "exit"
            self._exit(self._final_code)
            return
        self.fired = "hang"
        try:
            self.dump_to.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_to, "w") as f:
                f.write(f"pid {os.getpid()}: no training progress for {idle:.1f} s "
                        f"(run.hang_timeout_s={self.timeout_s:g}); every thread's stack follows, the "
                        f"main thread's shows where it is stuck.\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as err:
            print(f"imagenet-trainer: watchdog could not write {self.dump_to}: {err}", flush=True)
        if self.on_hang is not None:
            try:
                self.on_hang(self.dump_to, idle)
            except Exception as err:  # noqa: BLE001 - the exit must happen whatever the record does
                print(f"imagenet-trainer: watchdog could not record the hang: {err}", flush=True)
        self._exit(exits.HUNG.code)
