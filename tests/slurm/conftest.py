"""A real two-node SLURM cluster for tests (see tests/slurm/cluster.sh).

Fixture ``slurm_cluster`` (package scope) brings the cluster up once for the tests of this folder
and always tears it down after the last of them (``cluster.sh down``), also on failures and Ctrl-C:
its daemons, and any job a test left behind, must not share the CPUs with the rest of the suite.
Every test's jobs are cancelled when it ends.  It skips, with the
reason, where the cluster cannot be built: not root, no usable ``ip netns``, neither SLURM
nor ``apt-get`` present, or the packages cannot be installed.

Use ``slurm_cluster.env`` for every ``sbatch``/``srun``/``scontrol``/``squeue`` subprocess: it
is ``os.environ`` plus ``SLURM_CONF`` pointing at the cluster's ``slurm.conf`` (the clients
also find it through ``/etc/slurm/slurm.conf`` when the machine had none before, but pass the
env anyway).  Job steps see the host's filesystem, so ``sys.executable`` (the repo's venv)
works inside jobs.  Nodes: ``node1`` (10.77.0.11) and ``node2`` (10.77.0.12), 4 CPUs each,
2 fake ``gpu`` gres each (``--gpus-per-node`` sets ``CUDA_VISIBLE_DEVICES``; there is no GPU),
partition ``debug``; requeue works (``scontrol requeue`` reruns a job after about 12-31 s).
Only names listed in /etc/hosts may be used (no DNS lookups may leave this machine).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
DEFAULT_STATE_DIR = "/tmp/imagenet-trainer-slurm"
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
     "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)
SKIP_EXIT_CODE = 3  # cluster.sh: not root / packages missing and not installable
# The bridge, addresses and /etc/hosts entries are fixed, so one cluster per machine: pytest
# sessions that want it take this lock for their whole run (others wait up to LOCK_WAIT_S).
LOCK_PATH = "/tmp/imagenet-trainer-slurm.lock"
LOCK_WAIT_S = float(os.environ.get("SLURM_TEST_LOCK_WAIT", "900"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slurm: needs a real local SLURM cluster (root; tests/slurm/cluster.sh builds it)",
    )


# --------------------------------------------------------------------------- helpers
def parse_scontrol_record(text: str) -> Dict[str, str]:
    """Parse one ``scontrol show ... -o`` line into a dict.

    Values may contain spaces only for the keys that end a record (e.g. ``Command=``), so
    split on `` Key=`` boundaries: a token without ``=`` continues the previous value.
    """
    out: Dict[str, str] = {}
    last: Optional[str] = None
    for token in text.strip().split(" "):
        if not token:
            continue
        key, sep, value = token.partition("=")
        if sep and key and (key[0].isupper() or key[0].isdigit() or "/" in key):
            out[key] = value
            last = key
        elif last is not None:
            out[last] += " " + token
    return out


def _tail(path: Optional[str], n: int = 40) -> str:
    if not path or path in ("(null)", "/dev/null"):
        return "(no file)"
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(unreadable: {exc})"
    return "\n".join(lines[-n:])


def show_job(job_id: int | str, env: Dict[str, str]) -> Dict[str, str]:
    """``scontrol show job -o JOBID`` as a dict ({} when SLURM no longer knows the job)."""
    res = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)],
        env=env, capture_output=True, text=True, timeout=30,
    )
    if res.returncode != 0 or not res.stdout.strip():
        return {}
    return parse_scontrol_record(res.stdout.splitlines()[0])


def wait_for_job(job_id: int | str, env: Dict[str, str], timeout: float = 120.0,
                 poll: float = 0.5) -> Dict[str, str]:
    """Poll ``scontrol show job -o JOBID`` until JobState is terminal; return the key=values.

    Terminal: COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY (and the rarer
    BOOT_FAIL, DEADLINE, PREEMPTED).  On timeout raises TimeoutError carrying the job record
    and the tails of its StdOut/StdErr files.  ``info["ExitCode"]`` is ``"rc:signal"``.
    """
    deadline = time.monotonic() + timeout
    info: Dict[str, str] = {}
    while True:
        info = show_job(job_id, env) or info
        state = info.get("JobState", "")
        if state in TERMINAL_STATES:
            return info
        if time.monotonic() > deadline:
            break
        time.sleep(poll)
    out, err = info.get("StdOut"), info.get("StdErr")
    msg = [f"job {job_id} not finished after {timeout:.0f}s: JobState={info.get('JobState')} "
           f"Reason={info.get('Reason')}", f"record: {info}",
           f"--- stdout {out}:\n{_tail(out)}"]
    if err and err != out:
        msg.append(f"--- stderr {err}:\n{_tail(err)}")
    raise TimeoutError("\n".join(msg))


@dataclasses.dataclass
class SlurmCluster:
    """What a test needs to use the cluster; yielded by the ``slurm_cluster`` fixture."""

    state_dir: Path                 # the cluster's state dir (slurm.conf, logs, spool)
    conf: Path                      # state_dir / "slurm.conf"
    partition: str                  # "debug" (the default partition)
    nodes: List[str]                # ["node1", "node2"]
    controller: str                 # "slurmctl" (10.77.0.1)
    cpus_per_node: int              # 4
    gpus_per_node: int              # fake gres/gpu per node (2; 0 = none)
    env: Dict[str, str]             # os.environ + SLURM_CONF: use for every subprocess
    script: Path = CLUSTER_SH

    def run(self, *args: str, check: bool = True, timeout: float = 60.0,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a SLURM client command (``cluster.run("squeue")``) with ``self.env``."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout, **kwargs)

    def sbatch(self, script: str | os.PathLike, *args: str, cwd: str | os.PathLike | None = None) -> int:
        """``sbatch --parsable ARGS SCRIPT``; returns the job id."""
        res = self.run("sbatch", "--parsable", *args, str(script), cwd=cwd)
        return int(res.stdout.strip().split(";")[0])

    def show_job(self, job_id: int | str) -> Dict[str, str]:
        return show_job(job_id, self.env)

    def wait_for_job(self, job_id: int | str, timeout: float = 120.0) -> Dict[str, str]:
        return wait_for_job(job_id, self.env, timeout)

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--full", "--partition", self.partition],
                       env=self.env, capture_output=True, timeout=30)


# --------------------------------------------------------------------------- fixture
def _skip_reason() -> Optional[str]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces, /etc/hosts, slurmd)"
    if not shutil.which("ip") or not shutil.which("nsenter") or not shutil.which("unshare"):
        return "needs iproute2 `ip`, nsenter and unshare"
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have_slurm and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    probe = f"itslurm-probe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if res.returncode != 0:
        return f"`ip netns add` does not work here: {res.stderr.strip()}"
    return None


def _cluster_sh(cmd: str, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SH), cmd], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="package")
def slurm_cluster():
    """Bring up the 2-node cluster for tests/slurm/; always tear it down afterwards."""
    reason = _skip_reason()
    if reason:
        pytest.skip(f"slurm_cluster: {reason}")
    lock = open(LOCK_PATH, "a")
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                pytest.fail(f"another pytest session holds {LOCK_PATH} (the test SLURM "
                            f"cluster) for over {LOCK_WAIT_S:.0f}s")
            time.sleep(1)
    state_dir = Path(os.environ.get("SLURM_TEST_DIR", DEFAULT_STATE_DIR))
    gpus = int(os.environ.get("SLURM_TEST_FAKE_GPUS", "2"))
    sh_env = dict(os.environ, SLURM_TEST_DIR=str(state_dir))
    try:
        try:
            res = _cluster_sh("up", sh_env, timeout=600)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"cluster.sh up timed out after {exc.timeout}s")
        if res.returncode == SKIP_EXIT_CODE:
            pytest.skip(f"slurm_cluster: cannot build the cluster here: {res.stderr.strip()[-800:]}")
        if res.returncode != 0:
            pytest.fail(f"cluster.sh up failed (exit {res.returncode}):\n"
                        f"{res.stdout[-2000:]}\n{res.stderr[-6000:]}", pytrace=False)
        conf = state_dir / "slurm.conf"
        env = dict(os.environ, SLURM_CONF=str(conf))
        # Never leak an outer allocation's settings into the test cluster's commands.
        for key in list(env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del env[key]
        yield SlurmCluster(
            state_dir=state_dir, conf=conf, partition="debug", nodes=["node1", "node2"],
            controller="slurmctl", cpus_per_node=4, gpus_per_node=max(gpus, 0), env=env,
        )
    finally:
        try:
            res = _cluster_sh("down", sh_env, timeout=120)
            if res.returncode != 0:
                print(f"cluster.sh down failed (exit {res.returncode}):\n{res.stderr}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test(request):
    """Cancel whatever a test left queued or running (a failed assertion skips its own clean-up):
    a job that requeues itself would otherwise train on through every later test."""
    yield
    if "slurm_cluster" in request.fixturenames:
        request.getfixturevalue("slurm_cluster").cancel_all()
