"""The job's supervisor: requeue a SLURM job after a failure it can survive, without the bad node.

    python -m trainer.cluster.supervise -- srun --kill-on-bad-exit=1 python -m trainer fit ...

slurm/train.sbatch ``exec``s this around its ``srun``, so the supervisor is the batch script's last
process: its last line is the job's, its exit code the job's. Why a process around srun, and not a
shell ``if`` or a rank: a rank that segfaults, is OOM-killed or hangs cannot say it failed, and
only srun sees every task end; the batch step also outlives the step, so it can requeue after every
rank is gone (no rank is left writing a checkpoint while the next run starts).

What it does:

- Runs the command. Its stdout is the job's stdout (inherited, untouched); its stderr passes through
  line by line, unchanged, while the supervisor reads srun's own lines of failed tasks::

      srun: error: node2: task 1: Exited with exit code 1
      srun: error: node[1-2]: tasks 0-3: Killed

  (:func:`parse_srun_line`: host(s), tasks, and the exit code; a signal is 128 + its number).
- Exit 0: exits 0 (finished, or preempted and already requeued by rank 0: preemption.py).
- Otherwise picks the failure that caused it (:func:`primary`): a cause a retry cannot fix
  (exits.py: a config or data error, 2; diverged, 13) wins, then the first task that failed on its
  own (not a lost peer, 12, nor a task srun killed after another failed), then the first.
- Decides (:func:`decide`): a retryable cause (a crash, a hang, a failed health check) is retried
  while fewer than ``run.max_restarts`` failure requeues of this job are in ``RUN_DIR/failures.jsonl``
  (counted there, not with ``SLURM_RESTART_COUNT``, so that the requeues of preemptions, which
  lose nothing, never use up the retries of a long run).
- Records the decision as one line of ``RUN_DIR/failures.jsonl`` (trainer/cluster/failures.py's
  record, its host and rank the failed task's, plus ``decision`` and ``excluded``), then either
  requeues the job (``scontrol requeue``, the launch layer's :func:`requeue_command`) and excludes
  the failed task's node (``scontrol update JobId=J ExcNodeList=...``, keeping the nodes excluded
  before; SLURM takes it once the requeue made the job pending again, so it comes second), or prints
  ``imagenet-trainer: not retrying: <cause> (exit N): <what to do>`` as the job's last line and
  exits with the code.

A node is not excluded for a lost peer (12: the node was fine, its peer was not) or when fewer
nodes than the job needs would be left in its partition (the job would pend forever). A node that
SLURM itself loses (NODE_FAIL) is SLURM's own requeue (``--requeue``), not this one's.

The requeued job resumes like a preempted one, from the newest checkpoint in RUN_DIR (hpc_ckpt_N or
checkpoints/last.ckpt) at its exact step and data position; the steps since it are trained again.

SIGTERM and SIGINT (scancel, the time limit, the kill that follows a requeue) are not acted on here:
srun gets them too and ends the tasks, whose last lines still pass through; the supervisor then
exits with srun's code and decides nothing (SLURM decides on a requeue). SIGUSR1 is passed on to
srun (which passes it to the tasks), for ``--signal=B:USR1@N``, which signals the batch step only.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from trainer.cluster import exits

PREFIX = "imagenet-trainer"
DEFAULT_MAX_RESTARTS = 3

# srun (src/srun/launch.c, _task_finish): "HOSTS: task(s) IDS: Exited with exit code N" or
# "HOSTS: task(s) IDS: <strsignal>[ (core dumped)]".
_SRUN_LINE = re.compile(r"srun: error: (?P<hosts>\S+): tasks? (?P<tasks>[0-9,\-]+): (?P<what>.+?)\s*$")
_EXITED = re.compile(r"Exited with exit code (\d+)")


@dataclasses.dataclass(frozen=True)
class TaskFailure:
    """One srun error line: these tasks on these hosts ended with ``code``."""
    hosts: tuple[str, ...]
    tasks: tuple[int, ...]
    code: int
    signalled: bool  # ended by a signal (code 128 + its number)

    @property
    def exit(self) -> exits.Exit:
        return exits.describe(self.code)


def expand_hostlist(text: str) -> list[str]:
    """SLURM's ``node[1-3,5],gpu7`` as names (one bracket per name, as SLURM writes them)."""
    names: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", text):
        head, ranges, tail = m.group(1), m.group(2), m.group(3)
        if not head and not ranges:
            continue
        if ranges is None:
            names.append(head + tail)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if hi:
                width = len(lo)
                names.extend(f"{head}{i:0{width}d}{tail}" for i in range(int(lo), int(hi) + 1))
            else:
                names.append(f"{head}{lo}{tail}")
    return names


def expand_ids(text: str) -> tuple[int, ...]:
    """``0-2,5`` as (0, 1, 2, 5)."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def _signal_number(text: str) -> int | None:
    text = text.replace("(core dumped)", "").strip().lower()
    for sig in signal.Signals:
        try:
            if (signal.strsignal(sig) or "").lower() == text:
                return int(sig)
        except ValueError:
            continue
    return None


def parse_srun_line(line: str) -> TaskFailure | None:
    """The failure an srun error line reports, or None for any other line."""
    m = _SRUN_LINE.search(line)
    if not m:
        return None
    what = m["what"]
    exited = _EXITED.fullmatch(what)
    if exited:
        code, signalled = int(exited.group(1)), False
    else:
        signum = _signal_number(what)
        if signum is None:
            return None
        code, signalled = 128 + signum, True
    return TaskFailure(tuple(expand_hostlist(m["hosts"])), expand_ids(m["tasks"]), code, signalled)


def primary(failures: Sequence[TaskFailure]) -> TaskFailure | None:
    """The failure that ended the step (see the module doc)."""
    if not failures:
        return None
    for f in failures:
        if not f.exit.retry and f.code not in (0, exits.TERMINATED.code):
            return f
    for f in failures:
        if not _like_peer(f) and not (f.signalled and f.code in (128 + signal.SIGKILL, 128 + signal.SIGTERM)):
            return f
    return failures[0]


def _like_peer(f: TaskFailure) -> bool:
    """A task that most likely ended because another one failed: exit 12 (a lost peer, seen by
    Python), or SIGABRT, which is how NCCL's own watchdog ends a rank whose collective timed out
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=3 "takes the entire process down"; no Python runs)."""
    return f.exit.cause == exits.PEER.cause or (f.signalled and f.code == 128 + signal.SIGABRT)


@dataclasses.dataclass(frozen=True)
class Decision:
    exit: exits.Exit
    retry: bool
    reason: str  # why (not) retried
    host: str | None  # the failed task's node, if one
    rank: int | None
    exclude: str | None = None  # the node to exclude before the retry, if any


def decide(failure: TaskFailure | None, step_code: int, retries_done: int, max_restarts: int) -> Decision:
    """Retry or not, for the step's ``failure`` (None: srun failed before any task reported)."""
    ex = failure.exit if failure is not None else exits.describe(step_code)
    rank = failure.tasks[0] if failure is not None and failure.tasks else None
    host = failure.hosts[0] if failure is not None and len(failure.hosts) == 1 else None
    # Never the node of a rank that only saw its peer go: that node is probably healthy.
    exclude = host if failure is not None and not _like_peer(failure) else None
    if not ex.retry:
        return Decision(ex, False, "a retry cannot fix this", host, rank)
    if retries_done >= max_restarts:
        return Decision(ex, False, f"the job was requeued after failures {retries_done} time(s) already "
                                   f"(run.max_restarts={max_restarts})", host, rank)
    return Decision(ex, True, f"retry {retries_done + 1} of run.max_restarts={max_restarts}", host, rank, exclude)


_ADVICE = {
    "config": "fix the config or data error named above and resubmit",
    "diverged": "the losses diverged: lower optim.lr or fix the data, then resubmit "
                "(run.dir keeps the checkpoints)",
    "requeue-failed": "resubmit with the same run.dir to resume from its checkpoint",
    "terminated": "stopped by SIGTERM; SLURM requeues it if it was preempted, else resubmit with the same "
                  "run.dir to resume",
}


def last_line(d: Decision, run_dir: str | os.PathLike | None) -> str:
    """``imagenet-trainer: not retrying: <cause> (exit N): <what to do>``."""
    where = f"; see {Path(run_dir) / 'failures.jsonl'}" if run_dir else ""
    if d.exit.retry:
        todo = (f"{d.reason}; find the cause in the log and the dumps{where}, then resubmit with the same "
                f"run.dir to resume (or raise run.max_restarts)")
    else:
        todo = _ADVICE.get(d.exit.cause, d.exit.meaning) + where
    who = f" of rank {d.rank}" if d.rank is not None else ""
    return f"{PREFIX}: not retrying: {d.exit.cause}{who} (exit {d.exit.code}): {todo}"


def excluded_nodes(job_record: Mapping[str, str]) -> list[str]:
    """The nodes ``scontrol show job`` lists in ExcNodeList (none: [])."""
    value = job_record.get("ExcNodeList", "")
    return [] if value in ("", "(null)") else expand_hostlist(value)


def exclude_command(job: str, earlier: Iterable[str], host: str) -> list[str]:
    """``scontrol update JobId=J ExcNodeList=earlier...,host`` (each node once, in order)."""
    nodes = list(dict.fromkeys([*earlier, host]))
    return ["scontrol", "update", f"JobId={job}", f"ExcNodeList={','.join(nodes)}"]


def parse_scontrol_record(text: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` line as key -> value (a value may hold spaces)."""
    out: dict[str, str] = {}
    last = None
    for token in text.strip().split(" "):
        key, sep, value = token.partition("=")
        if sep and key and key[:1].isupper():
            out[key], last = value, key
        elif last is not None and token:
            out[last] += " " + token
    return out


def failure_requeues(records: Iterable[dict], job: str | None) -> int:
    """How often this job was requeued after a failure: the supervisor's ``requeue`` records."""
    return sum(1 for r in records if r.get("decision") == "requeue" and str(r.get("job")) == str(job))


# --- the command ---------------------------------------------------------------------------------


def _fit_overrides(cmd: Sequence[str]) -> list[str] | None:
    """The config overrides of ``... -m trainer fit OVERRIDES`` in ``cmd`` (None when not a fit)."""
    for i in range(1, len(cmd)):
        if cmd[i] == "fit" and (cmd[i - 1] == "trainer" or cmd[i - 1].endswith("imagenet-trainer")):
            return [a for a in cmd[i + 1:] if "=" in a and not a.startswith("-")]
    return None


def run_settings(overrides: Sequence[str] | None) -> tuple[str | None, int]:
    """(run.dir, run.max_restarts) of the job's config; from the overrides alone when it does not load
    (None: not a fit, no run directory)."""
    if overrides is None:
        return None, DEFAULT_MAX_RESTARTS
    try:
        from trainer.config import load_config

        cfg = load_config(list(overrides))
        return str(cfg.run.dir), int(cfg.run.max_restarts)
    except Exception:  # noqa: BLE001 - a bad config is the ranks' to report (exit 2)
        run_dir, max_restarts = None, DEFAULT_MAX_RESTARTS
        for item in overrides:
            key, _, value = item.partition("=")
            if key == "run.dir":
                run_dir = value
            elif key == "run.max_restarts" and value.isdigit():
                max_restarts = int(value)
        return run_dir, max_restarts


def _scontrol(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, env=dict(env))
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(args, 1, "", str(err))


def _usable_nodes(job: Mapping[str, str], excluded: Sequence[str], env: Mapping[str, str]) -> int | None:
    """How many nodes of the job's partition are left after ``excluded`` (None: unknown)."""
    part = job.get("Partition", "")
    if not part:
        return None
    res = _scontrol(["sinfo", "-h", "-N", "-p", part, "-o", "%N"], env)
    if res.returncode != 0:
        return None
    nodes = set(res.stdout.split())
    return len(nodes - set(excluded)) if nodes else None


def _record(run_dir: str | None, d: Decision, decision: str, excluded: list[str],
            detail: str, env: Mapping[str, str]) -> None:
    if not run_dir:
        return
    from data_pipelines.launch import restart_count
    from trainer.cluster import failures

    restart = restart_count(env)
    dump = None
    if d.rank is not None:
        path = failures.dump_path(run_dir, d.exit.cause, d.rank, restart)
        dump = path if path.exists() else None
    rec = json.loads(failures.record_line(d.exit, rank=-1 if d.rank is None else d.rank, dump=dump, detail=detail,
                                          env=env))
    rec.update(host=d.host or rec["host"], rank=d.rank, pid=None, decision=decision, excluded=excluded)
    try:
        failures.append(run_dir, json.dumps(rec, ensure_ascii=True) + "\n")
    except OSError as err:
        print(f"{PREFIX}: could not append to {Path(run_dir) / failures.FILE}: {err}", file=sys.stderr, flush=True)


def handle_failure(code: int, failed: Sequence[TaskFailure], overrides: Sequence[str] | None,
                   env: Mapping[str, str] = os.environ) -> int:
    """Decide, record, and requeue (0) or stop (the cause's exit code)."""
    run_dir, max_restarts = run_settings(overrides)
    job = env.get("SLURM_JOB_ID")
    done = 0
    if run_dir:
        from trainer.cluster import failures

        try:
            done = failure_requeues(failures.read(run_dir), job)
        except (OSError, ValueError):
            from data_pipelines.launch import restart_count

            done = restart_count(env)
    first = primary(failed)
    d = decide(first, code, done, max_restarts)
    stop_code = d.exit.code
    if not d.retry or not job:
        _record(run_dir, d, "stop", [], d.reason, env)
        print(last_line(d, run_dir), file=sys.stderr, flush=True)
        return stop_code

    record = parse_scontrol_record(_scontrol(["scontrol", "show", "job", "-o", job], env).stdout)
    earlier = excluded_nodes(record)
    exclude = None
    if d.exclude:
        left = _usable_nodes(record, [*earlier, d.exclude], env)
        needed = int(record.get("NumNodes", "1").split("-")[0] or 1)
        if left is not None and left < needed:
            print(f"{PREFIX}: not excluding {d.exclude}: the job needs {needed} node(s) and its partition would "
                  f"have {left}", file=sys.stderr, flush=True)
        else:
            exclude = exclude_command(job, earlier, d.exclude)
    excluded = list(dict.fromkeys([*earlier, d.exclude])) if exclude else earlier
    who = f"rank {d.rank}" + (f" on {d.host}" if d.host else "")
    detail = f"{d.reason}; requeued" + (f" without {', '.join(excluded)}" if excluded else "")
    _record(run_dir, d, "requeue", excluded, detail, env)
    print(f"{PREFIX}: {d.exit.cause} of {who} (exit {stop_code}): {detail}", file=sys.stderr, flush=True)
    from data_pipelines.launch import requeue_command

    requeue = requeue_command(env)
    res = _scontrol(requeue, env)
    if res.returncode != 0:
        _record(run_dir, d, "stop", earlier, f"the requeue failed: {shlex.join(requeue)} exited {res.returncode}", env)
        print(f"{PREFIX}: not retrying: requeue-failed (exit {exits.REQUEUE_FAILED.code}): {shlex.join(requeue)} "
              f"exited {res.returncode}: {res.stderr.strip()[-300:]}; resubmit with the same run.dir to resume",
              file=sys.stderr, flush=True)
        return stop_code
    if exclude:
        # SLURM takes ExcNodeList only from a pending job: after the requeue. The requeue's SIGTERM
        # to this batch step is ignored (main), and this runs well inside its KillWait.
        for _ in range(10):
            res = _scontrol(exclude, env)
            if res.returncode == 0:
                break
            time.sleep(0.5)
        if res.returncode != 0:
            print(f"{PREFIX}: could not exclude {d.exclude}: {shlex.join(exclude)}: {res.stderr.strip()[-300:]}",
                  file=sys.stderr, flush=True)
    return 0


def supervise(cmd: Sequence[str], env: Mapping[str, str] = os.environ) -> int:
    """Run ``cmd`` (srun), pass its output through, and handle a failure (module doc)."""
    stopped: list[int] = []

    def note(signum, frame):  # srun receives these too and ends the tasks; we wait for it
        stopped.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, note)
    failed: list[TaskFailure] = []
    try:
        proc = subprocess.Popen(list(cmd), stderr=subprocess.PIPE)
    except OSError as err:
        print(f"{PREFIX}: cannot run {shlex.join(cmd)}: {err}", file=sys.stderr, flush=True)
        return 127

    def forward(signum, frame):  # --signal=B:USR1@N signals only the batch step: pass it on to srun
        try:
            proc.send_signal(signum)
        except OSError:
            pass

    signal.signal(signal.SIGUSR1, forward)
    out = sys.stderr.buffer
    for raw in iter(proc.stderr.readline, b""):
        try:
            out.write(raw)
            out.flush()
        except OSError:
            pass
        if b"srun: error:" in raw:
            f = parse_srun_line(raw.decode(errors="replace"))
            if f is not None:
                failed.append(f)
    code = proc.wait()
    if code == 0 or stopped:
        return code
    if code < 0:  # srun itself killed by a signal
        code = 128 - code
    return handle_failure(code, failed, _fit_overrides(cmd), env)


def _flight_recorder_env(cmd: Sequence[str]) -> None:
    """Point NCCL's flight recorder dumps at RUN_DIR/failures/ when the job did not choose a place."""
    if os.environ.get("TORCH_FR_DUMP_TEMP_FILE"):
        return
    overrides = _fit_overrides(cmd)
    if overrides is None:
        return
    dirs = [item.partition("=")[2] for item in overrides if item.startswith("run.dir=")]
    # The last run.dir= wins (the script's, then the user's); only an interpolated one needs the
    # config composed (which imports torch: seconds at every job start).
    run_dir = dirs[-1] if dirs and "${" not in dirs[-1] else run_settings(overrides)[0]
    if run_dir:
        dumps = Path(run_dir) / "failures"
        try:
            dumps.mkdir(parents=True, exist_ok=True)
        except OSError:
            return
        # One prefix per run of the job: a requeued run's dumps must not overwrite the last one's.
        # Read here, not with data_pipelines.launch.restart_count: importing data_pipelines loads torch,
        # seconds at every job start, and this runs before any failure.
        restart = os.environ.get("SLURM_RESTART_COUNT", "").strip() or "0"
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = str(dumps.resolve() / f"nccl_trace_restart{restart}_rank_")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(f"usage: python -m trainer.cluster.supervise -- srun ... python -m trainer fit OVERRIDES",
              file=sys.stderr)
        return 2
    _flight_recorder_env(args)
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
