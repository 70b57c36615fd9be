"""Failing fast on a dead or hung rank (trainer/cluster/failfast.py, watchdog.py, failures.py).

The fast tests run the failure record and the watchdog thread in this process. The slow ones run
2 real DDP ranks (gloo, CPU) of `imagenet-trainer fit` as separate processes, as srun starts them,
and make one of them hang (IMAGENET_TRAINER_FAULT), stop (SIGSTOP from here) or crash (a
segfault): every rank must exit soon, with the exit code of its cause, a dump and a record.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CPU_FIT
from trainer.cluster import exits, failures
from trainer.cluster.watchdog import Watchdog
from trainer.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


# --- the failure record ------------------------------------------------------------------------

def test_a_record_is_one_json_line_with_the_job_restart_host_rank_code_cause_and_dump(tmp_path):
    env = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2"}
    line = failures.record_line(exits.PEER, rank=3, dump=tmp_path / "d.txt", detail="Timed out\n  waiting", env=env)
    assert line.endswith("\n") and line.count("\n") == 1
    rec = json.loads(line)
    assert rec["job"] == "4242" and rec["restart"] == 2 and rec["rank"] == 3 and rec["host"] == socket.gethostname()
    assert rec["exit_code"] == 12 and rec["cause"] == "peer" and rec["retry"] is True
    assert rec["dump"] == str(tmp_path / "d.txt") and rec["detail"] == "Timed out waiting"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", rec["time"])
    outside = json.loads(failures.record_line(exits.CRASH, rank=0, env={}))
    assert outside["job"] is None and outside["restart"] == 0 and outside["dump"] is None


def test_a_long_detail_is_shortened_to_keep_the_line_one_atomic_write():
    line = failures.record_line(exits.CRASH, rank=0, detail="é" * 10_000 + "x" * 10_000, env={})
    assert len(line.encode()) <= failures.MAX_LINE < 4096
    assert json.loads(line)["detail"].startswith("é")


def test_ranks_appending_at_once_never_interleave_lines(tmp_path):
    def write(rank: int) -> None:
        for i in range(200):
            failures.append(tmp_path, failures.record_line(exits.HUNG, rank=rank, detail=f"{i} " + "y" * 3000, env={}))

    threads = [threading.Thread(target=write, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = failures.read(tmp_path)
    assert len(records) == 800 and {r["rank"] for r in records} == {0, 1, 2, 3}


@pytest.mark.parametrize("err, cause", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"), "peer"),
    (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv operation"), "peer"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "crash"),
    (KeyError("x"), "crash"),
])
def test_a_broken_or_timed_out_process_group_is_a_peer_failure_anything_else_a_crash(err, cause):
    assert failures.classify(err).cause == cause


def test_an_error_with_an_exit_code_of_its_own_keeps_it():
    class Diverged(Exception):  # as trainer/cluster/guard.py's
        exit_code = exits.DIVERGED.code

    assert failures.classify(Diverged("nan")) is exits.DIVERGED


def test_nccls_backend_error_is_a_peer_failure():
    from torch.distributed import DistBackendError

    assert failures.classify(DistBackendError("NCCL error: remote process exited")) is exits.PEER


def test_a_fit_error_is_recorded_once_with_its_traceback_and_the_stacks(tmp_path):
    """What FailFast.on_exception and the CLI record for an exception out of fit: one line (the
    CLI's second call for the same exception adds none), the dump holding the traceback."""
    from trainer.cluster.failfast import record_failure

    def deep_in_the_step():
        raise KeyError("a bug")

    try:
        deep_in_the_step()
    except KeyError as err:
        assert record_failure(tmp_path, err, rank=1) is exits.CRASH
        assert record_failure(tmp_path, err, rank=1) is exits.CRASH
    (rec,) = failures.read(tmp_path)
    assert rec["cause"] == "crash" and rec["exit_code"] == 1 and rec["rank"] == 1 and rec["detail"] == "KeyError: 'a bug'"
    text = Path(rec["dump"]).read_text()
    assert rec["dump"] == str(tmp_path / "failures" / "crash-rank1-restart0.txt")
    assert "deep_in_the_step" in text and "Every thread's stack" in text


# --- the watchdog ------------------------------------------------------------------------------

def _stuck_here(release: threading.Event) -> None:
    release.wait()


def test_the_watchdog_dumps_every_stack_and_exits_hung_when_progress_stops(tmp_path):
    """A loop that beats for a while, then blocks in _stuck_here: the dump names that frame."""
    exited, hung = [], []
    dog = Watchdog(0.5, tmp_path / "failures" / "hang.txt", on_hang=lambda path, idle: hung.append((path, idle)),
                   exit=exited.append).start()
    release = threading.Event()

    def loop() -> None:
        for _ in range(10):
            dog.beat()
            time.sleep(0.05)
        _stuck_here(release)

    worker = threading.Thread(target=loop, name="training-loop", daemon=True)
    worker.start()
    dog.join(10)
    release.set()
    assert exited == [exits.HUNG.code] and dog.fired == "hang"
    ((path, idle),) = hung
    assert path == tmp_path / "failures" / "hang.txt" and idle >= 0.5
    text = path.read_text()
    assert "no training progress" in text and "_stuck_here" in text and "loop" in text


def test_the_watchdog_stays_quiet_while_progress_continues_and_stops_when_asked(tmp_path):
    exited = []
    dog = Watchdog(0.3, tmp_path / "hang.txt", exit=exited.append).start()
    end = time.monotonic() + 1.2
    while time.monotonic() < end:
        dog.beat()
        time.sleep(0.02)
    dog.stop()
    dog.join(5)
    assert not dog.alive and exited == [] and dog.fired is None and not (tmp_path / "hang.txt").exists()


def test_the_first_allowance_holds_until_the_timeout_is_set_then_the_short_one(tmp_path):
    exited = []
    dog = Watchdog(0.2, tmp_path / "hang.txt", first_timeout_s=30, exit=exited.append).start()
    time.sleep(0.5)
    assert exited == []  # start-up: the long allowance
    dog.set_timeout(0.2)  # the first step ran: it fires at once (0.5 s since the last beat)
    dog.join(5)
    assert exited == [exits.HUNG.code]


def test_exit_within_ends_a_process_stuck_on_its_way_out_with_its_own_code(tmp_path):
    exited = []
    dog = Watchdog(30, tmp_path / "hang.txt", exit=exited.append).start()
    dog.exit_within(exits.PEER.code, 0.2)
    dog.join(5)
    assert exited == [exits.PEER.code] and dog.fired == "exit" and not (tmp_path / "hang.txt").exists()


# --- config ------------------------------------------------------------------------------------

def test_failure_settings_default_to_no_watchdog_and_are_validated():
    run = load_config(["data.root=/x"]).run
    assert (run.pg_timeout_init_s, run.pg_timeout_s, run.hang_timeout_s, run.max_restarts) == (600, 120, None, 3)
    for bad, key in [("run.pg_timeout_s=900", "run.pg_timeout_s"), ("run.hang_timeout_s=0", "run.hang_timeout_s"),
                     ("run.pg_timeout_init_s=-1", "run.pg_timeout_init_s"), ("run.max_restarts=-1", "run.max_restarts")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(["data.root=/x", bad])


def test_docs_show_the_exit_code_table():
    """docs/clusters.md's table is exits.TABLE, row for row (code, cause, retried, meaning)."""
    text = (REPO / "docs" / "clusters.md").read_text()
    rows = re.findall(r"^\| `(\d+)` \| (\S+) \| (yes|no) \| (.+?) \|$", text, re.M)
    assert rows == [(str(e.code), e.cause, "yes" if e.retry else "no", e.meaning) for e in exits.TABLE]


# --- two real ranks ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """Both ranks of `imagenet-trainer fit` as separate processes (each its own session, so that
    a stuck one and its children can be killed whole); logs in OUT/rank<R>.log."""

    def __init__(self, root: Path, out: Path, *overrides: str, fault: str = "", wandb: str = "disabled") -> None:
        self.out, self.run_dir = out, out / "run"
        out.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "WANDB_")) and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()), WORLD_SIZE="2", NODE_RANK="0", NETRC=str(out / "no-netrc"))
        if fault:
            env["IMAGENET_TRAINER_FAULT"] = fault
        # 64 train images, 2 ranks x batch 4: 8 steps an epoch.
        args = [*CPU_FIT, f"data.root={root}", f"run.dir={self.run_dir}", "trainer.devices=2", "data.batch_size=4",
                "trainer.max_epochs=3", "trainer.limit_val_batches=1", f"logger.wandb.mode={wandb}",
                f"run.record_samples={out / 'progress'}", *overrides]
        self.procs, self.ended = [], {}
        for rank in (0, 1):
            log = open(out / f"rank{rank}.log", "w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "trainer", "fit", *args], cwd=REPO,
                                               env={**env, "LOCAL_RANK": str(rank)}, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
            log.close()

    def steps_done(self, rank: int) -> int:
        path = self.out / f"progress.rank{rank}.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    def last_progress(self, rank: int) -> float:
        return (self.out / f"progress.rank{rank}.jsonl").stat().st_mtime

    def wait(self, timeout: float, ranks=(0, 1)) -> dict[int, int]:
        """Each rank's exit code, and (in self.ended) when it ended; fails the test, with the logs,
        when one is still running after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.ended) < len(ranks):
            for rank in ranks:
                if rank not in self.ended and self.procs[rank].poll() is not None:
                    self.ended[rank] = time.time()
            time.sleep(0.2)
        if len(self.ended) < len(ranks):
            self.kill()
            pytest.fail(f"ranks still running after {timeout:.0f}s:\n{self.logs()}")
        return {rank: self.procs[rank].returncode for rank in ranks}

    def wait_for_steps(self, rank: int, steps: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.steps_done(rank) < steps:
            if time.monotonic() > deadline or self.procs[rank].poll() is not None:
                self.kill()
                pytest.fail(f"rank {rank} did not reach {steps} steps:\n{self.logs()}")
            time.sleep(0.1)

    def kill(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(30)

    def logs(self) -> str:
        return "\n".join(f"--- rank {r}:\n" + (self.out / f"rank{r}.log").read_text()[-4000:] for r in (0, 1))


@pytest.fixture
def ranks(tmp_path):
    started: list[Ranks] = []

    def start(*args, **kwargs) -> Ranks:
        started.append(Ranks(*args, **kwargs))
        return started[-1]

    yield start
    for r in started:
        r.kill()


FAST = ["run.pg_timeout_init_s=60", "run.pg_timeout_s=15"]


@pytest.mark.slow
def test_a_hung_rank_dumps_its_stacks_and_every_rank_exits_soon(tiny_root, tmp_path, ranks):
    job = ranks(tiny_root, tmp_path, *FAST, "run.hang_timeout_s=8", fault="hang@1:5")
    codes = job.wait(240)
    assert codes[1] == exits.HUNG.code and codes[0] in (exits.HUNG.code, exits.PEER.code), job.logs()
    hung_at = job.last_progress(1)  # its last trained batch: step 4
    assert all(t - hung_at < 8 + 60 for t in job.ended.values()), (job.ended, hung_at)
    dump = job.run_dir / "failures" / "hang-rank1-restart0.txt"
    assert "_injected_hang" in dump.read_text() and "on_train_batch_start" in dump.read_text()
    by_rank = {r["rank"]: r for r in failures.read(job.run_dir)}
    assert sorted(by_rank) == [0, 1], failures.read(job.run_dir)
    assert by_rank[1]["cause"] == "hang" and by_rank[1]["exit_code"] == 10 and by_rank[1]["dump"] == str(dump)
    assert by_rank[0]["exit_code"] == codes[0] and Path(by_rank[0]["dump"]).is_file()


@pytest.mark.parametrize("watchdog", ["8", "null"])
@pytest.mark.slow
def test_a_rank_stopped_from_outside_ends_its_peer_with_a_dump_and_a_record(tiny_root, tmp_path, ranks, watchdog):
    """Rank 1 frozen (SIGSTOP: its sockets stay open, its watchdog is frozen too). Rank 0's
    watchdog ends it (exit 10) after 8 s; without one, its collective times out after the short
    pg_timeout_s (15 s, not the start-up 60 s: the preemption flags' group follows it too): exit 12."""
    job = ranks(tiny_root, tmp_path, *FAST, f"run.hang_timeout_s={watchdog}")
    job.wait_for_steps(1, 3)
    os.kill(job.procs[1].pid, signal.SIGSTOP)
    stopped = time.time()
    codes = job.wait(120, ranks=(0,))
    assert codes[0] == (exits.HUNG.code if watchdog == "8" else exits.PEER.code), job.logs()
    assert job.ended[0] - stopped < (8 if watchdog == "8" else 15) + 30, job.ended[0] - stopped
    (rec,) = failures.read(job.run_dir)
    assert rec["rank"] == 0 and rec["exit_code"] == codes[0] and Path(rec["dump"]).is_file()
    job.kill()  # the stopped rank


@pytest.mark.slow
def test_a_crashed_rank_ends_its_peer_as_peer_failure_recorded_in_wandb(tiny_root, tmp_path, ranks):
    from tests.test_tracking import inspect, offline_runs

    job = ranks(tiny_root, tmp_path, *FAST, fault="crash@1:3", wandb="offline")  # no watchdog: the pg timeout
    codes = job.wait(240)
    assert codes == {0: exits.PEER.code, 1: -signal.SIGSEGV}, job.logs()
    assert job.ended[0] - job.ended[1] < 15 + 30
    (rec,) = failures.read(job.run_dir)
    assert rec["rank"] == 0 and rec["cause"] == "peer" and rec["exit_code"] == 12
    assert "Traceback" in Path(rec["dump"]).read_text()
    (run,) = offline_runs(job.run_dir)
    summary: dict = {}
    for r in inspect(run):
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["failure/cause"] == "peer" and summary["failure/exit_code"] == 12, summary
    assert summary["failure/rank"] == 0 and summary["failure/dump"] == rec["dump"]


@pytest.mark.slow
def test_a_normal_two_rank_fit_is_unaffected(tiny_root, tmp_path, ranks):
    """Defaults (no watchdog) and, in a second run, the watchdog on: both finish, no failure."""
    job = ranks(tiny_root, tmp_path / "off", "trainer.max_epochs=1")
    assert job.wait(180) == {0: 0, 1: 0}, job.logs()
    watched = ranks(tiny_root, tmp_path / "on", "trainer.max_epochs=1", "run.hang_timeout_s=30", *FAST)
    assert watched.wait(180) == {0: 0, 1: 0}, watched.logs()
    assert failures.read(job.run_dir) == failures.read(watched.run_dir) == []
    assert json.loads((watched.run_dir / "summary.json").read_text())["global_step"] == 8
