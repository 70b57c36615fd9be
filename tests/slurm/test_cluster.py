"""Sanity checks of the local 2-node SLURM cluster (tests/slurm/cluster.sh)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _write_script(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_srun_runs_on_both_nodes(slurm_cluster):
    res = slurm_cluster.run("srun", "-N2", "-n2", "hostname", timeout=60)
    assert sorted(res.stdout.split()) == ["node1", "node2"], res


def test_job_step_reaches_peer_and_controller_over_bridge(slurm_cluster):
    """Each step sits in its node's namespace: the peer's slurmd and the controller answer over
    the bridge; nothing else is routable (no default route)."""
    probe = (
        'peer=$([ "$(hostname)" = node1 ] && echo node2 || echo node1); '
        'timeout 5 bash -c "exec 3<>/dev/tcp/$peer/6818" && echo "$(hostname) peer-ok"; '
        'timeout 5 bash -c "exec 3<>/dev/tcp/slurmctl/6817" && echo "$(hostname) ctl-ok"; '
        'ip route show default | grep -q . || echo "$(hostname) no-default-route"'
    )
    res = slurm_cluster.run("srun", "-N2", "-n2", "bash", "-c", probe, timeout=60)
    for node in ("node1", "node2"):
        for what in ("peer-ok", "ctl-ok", "no-default-route"):
            assert f"{node} {what}" in res.stdout, res


def test_gloo_all_reduce_across_two_nodes(slurm_cluster, tmp_path):
    code = textwrap.dedent("""
        import os, socket, datetime
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
        assert rank == int(os.environ["RANK"]) and world == 2, (rank, world)
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        print(f"rank={rank} host={socket.gethostname()} sum={t.item():g}", flush=True)
        dist.destroy_process_group()
    """)
    (tmp_path / "allreduce.py").write_text(code)
    script = _write_script(tmp_path / "job.sh", f"""
        #!/bin/bash
        #SBATCH --job-name=gloo-allreduce
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --cpus-per-task=2
        #SBATCH --time=5
        #SBATCH --output={tmp_path}/out-%j.log
        set -euo pipefail
        export MASTER_ADDR=$(scontrol show hostnames "$SLURM_NODELIST" | head -1)
        export MASTER_PORT=29531
        echo "master=$MASTER_ADDR nodes=$SLURM_NODELIST ntasks=$SLURM_NTASKS"
        srun bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS exec {sys.executable} {tmp_path}/allreduce.py'
    """)
    job_id = slurm_cluster.sbatch(script, cwd=tmp_path)
    info = slurm_cluster.wait_for_job(job_id, timeout=90)
    out = (tmp_path / f"out-{job_id}.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out)
    assert "master=node1 nodes=node[1-2] ntasks=2" in out, out
    assert "rank=0 host=node1 sum=3" in out, out
    assert "rank=1 host=node2 sum=3" in out, out


def test_requeue_reruns_job_with_restart_count(slurm_cluster, tmp_path):
    script = _write_script(tmp_path / "requeue.sh", f"""
        #!/bin/bash
        #SBATCH --job-name=requeue
        #SBATCH --nodes=1
        #SBATCH --ntasks=1
        #SBATCH --requeue
        #SBATCH --open-mode=append
        #SBATCH --time=5
        #SBATCH --output={tmp_path}/out-%j.log
        echo "start restart=${{SLURM_RESTART_COUNT:-0}} host=$(hostname)"
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
            touch {tmp_path}/first-run
            exec sleep 300
        fi
        echo "$SLURM_RESTART_COUNT" > {tmp_path}/done
        echo finished
    """)
    job_id = slurm_cluster.sbatch(script, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not (tmp_path / "first-run").exists():
        assert time.monotonic() < deadline, slurm_cluster.show_job(job_id)
        time.sleep(0.3)
    slurm_cluster.run("scontrol", "requeue", str(job_id))
    info = slurm_cluster.wait_for_job(job_id, timeout=90)
    out = (tmp_path / f"out-{job_id}.log").read_text()
    assert info["JobState"] == "COMPLETED", (info, out)
    assert info["Restarts"] == "1", info
    assert (tmp_path / "done").read_text().strip() == "1", out
    assert "start restart=0" in out and "start restart=1" in out and "finished" in out, out


def test_wait_for_job_reports_failure(slurm_cluster, tmp_path):
    res = slurm_cluster.run("sbatch", "--parsable", f"--output={tmp_path}/fail-%j.log",
                            "--wrap", "echo about to fail; exit 7")
    info = slurm_cluster.wait_for_job(res.stdout.strip(), timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "7:0", info


def test_wait_for_job_timeout_shows_output_tail(slurm_cluster, tmp_path):
    res = slurm_cluster.run("sbatch", "--parsable", f"--output={tmp_path}/slow-%j.log",
                            "--wrap", "echo slow-job-marker; exec sleep 120")
    job_id = res.stdout.strip()
    try:
        with pytest.raises(TimeoutError, match="(?s)RUNNING.*slow-job-marker"):
            deadline = time.monotonic() + 30
            while slurm_cluster.show_job(job_id).get("JobState") != "RUNNING":
                assert time.monotonic() < deadline
                time.sleep(0.3)
            log = tmp_path / f"slow-{job_id}.log"  # created once the batch step starts
            while not log.exists() or "slow-job-marker" not in log.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.3)
            slurm_cluster.wait_for_job(job_id, timeout=1)
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
    assert slurm_cluster.wait_for_job(job_id, timeout=30)["JobState"] == "CANCELLED"


@pytest.mark.parametrize("name", ["slurmctl", "node1", "node2", "node1-v4mapped"])
def test_cluster_names_resolve_from_etc_hosts(slurm_cluster, name):
    # `getent hosts` with only the files service: never asks a DNS server.
    res = subprocess.run(["getent", "-s", "files", "hosts", name], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith(("10.77.0.", "::ffff:10.77.0.")), res
