"""imagenet-trainer on a real two-node SLURM cluster: submit, sbatch, requeue/resume, bad configs."""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CPU_JOB = ["--gpus-per-node", "0", "--cpus-per-task", "2", "--time", "00:10:00", "--partition", "debug"]


def _submit(cluster, workdir: Path, *args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.run([sys.executable, "-m", "trainer", "submit", *args], cwd=workdir, env=cluster.env,
                          capture_output=True, text=True, timeout=timeout)
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, f"no job id: {proc.stdout}\n{proc.stderr}"
    return proc, int(m.group(1))


def _logs(workdir: Path, job_id: int) -> str:
    return "".join(p.read_text() for p in sorted(workdir.glob(f"slurm-*-{job_id}.*")))


@pytest.mark.parametrize("nodes, tasks", [(1, 2), (2, 1)], ids=["1node-x2tasks", "2nodes-x1task"])
def test_submit_trains_with_every_rank_and_validates_exactly(slurm_cluster, tiny_root, tmp_path, nodes, tasks):
    run_dir = tmp_path / "run"
    proc, job_id = _submit(slurm_cluster, tmp_path, "--wait", "--nodes", str(nodes), "--tasks-per-node", str(tasks),
                           *CPU_JOB, "experiment=smoke", f"data.root={tiny_root}", "data.batch_size=6",
                           f"run.dir={run_dir}")
    logs = _logs(tmp_path, job_id)
    assert proc.returncode == 0, logs[-4000:]
    job = slurm_cluster.show_job(job_id)
    assert job["JobState"] == "COMPLETED"
    assert job["NumNodes"] == str(nodes)
    # Both ranks joined the process group (Lightning prints one line per rank).
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["val/images"] == 20  # 4 classes x 5, each counted once over both ranks
    assert summary["global_step"] == 64 // (2 * 6)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    single = run_cli("validate", summary["best_ckpt"], "--json", str(tmp_path / "v.json"))
    assert single.returncode == 0, single.stderr[-3000:]
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["images"] == 20 and result["top1"] == pytest.approx(summary["val/top1"], abs=1e-6)


def test_plain_sbatch_of_the_shipped_script_works(slurm_cluster, tiny_root, tmp_path):
    """`sbatch slurm/train.sbatch OVERRIDES` as docs/clusters.md shows, with the (fake) GPUs of the
    test nodes allocated: SLURM sets CUDA_VISIBLE_DEVICES, the job trains on the CPU."""
    run_dir = tmp_path / "run"
    env = {**slurm_cluster.env, "IMAGENET_TRAINER_PYTHON": sys.executable}
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2",
         "--cpus-per-task=2", "--time=00:10:00", str(REPO / "slurm" / "train.sbatch"),
         "trainer.accelerator=cpu", "experiment=smoke", f"data.root={tiny_root}", "data.batch_size=6",
         f"run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    job_id = int(proc.stdout.strip().split(";")[0])
    assert proc.returncode == 0, _logs(tmp_path, job_id)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["val/images"] == 20


def test_devices_contradicting_the_allocation_fails_at_once_naming_both(slurm_cluster, tiny_root, tmp_path):
    proc, job_id = _submit(slurm_cluster, tmp_path, "--wait", "--nodes", "1", "--tasks-per-node", "2", *CPU_JOB,
                           "experiment=smoke", f"data.root={tiny_root}", "trainer.devices=1",
                           f"run.dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    logs = _logs(tmp_path, job_id)
    assert "trainer.devices=1" in logs and "2 task(s) per node" in logs
    # A clear failure, not a DDP rendezvous hang: a rank exited with the config error's code 2 and
    # srun ended the step (a hang would end in the time limit or a kill, whatever the machine's
    # speed). The other rank exits 2 as well or is terminated by srun first, as the race goes: the
    # job's own exit code is either.
    assert re.search(r"tasks? [0-9,-]+: Exited with exit code 2", logs), logs[-4000:]  # "task 0" or "tasks 0-1"
    job = slurm_cluster.show_job(job_id)
    assert job["JobState"] == "FAILED", job


def test_submit_dry_run_quotes_every_value(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "submit", "--dry-run", "--job-name", "x;$(touch pwned)", "--nodes", "2",
         "--gpus-per-node", "0", "data.root=/d; rm -rf /", "run.dir=$(touch pwned2)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert "#SBATCH --job-name='x;$(touch pwned)'" in script
    assert "#SBATCH --nodes=2" in script and "--gpus-per-node" not in script.split("set -euo")[0].split("#SBATCH --job")[1]
    assert "set -- trainer.accelerator=cpu 'data.root=/d; rm -rf /' 'run.dir=$(touch pwned2)' \"$@\"" in script
    # Run the rendered argument line through bash: the values come out as text, nothing runs.
    line = next(l for l in script.splitlines() if l.startswith("set -- "))
    out = subprocess.run(["bash", "-c", f'{line}\nprintf "%s\\n" "$@"'], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.splitlines() == ["trainer.accelerator=cpu", "data.root=/d; rm -rf /", "run.dir=$(touch pwned2)"]
    assert not list(tmp_path.glob("pwned*"))


def _wait_for_log(cluster, workdir: Path, job_id: int, text: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in _logs(workdir, job_id):
        assert time.time() < deadline, _logs(workdir, job_id)[-4000:]
        assert cluster.show_job(job_id)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)


def test_usr1_checkpoints_requeues_and_resumes_at_the_same_step(slurm_cluster, tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    epochs, steps = 6, 64 // (2 * 4)
    # ResNet-18 at 64 px: slow enough on the CPU that the signal lands mid-run.
    proc, job_id = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--tasks-per-node", "2", *CPU_JOB,
                           "experiment=smoke", f"data.root={tiny_root}", "data.batch_size=4", "model.arch=resnet18",
                           "data.image_size=64", "data.val_resize=72", f"trainer.max_epochs={epochs}",
                           "trainer.log_every_n_steps=2", f"run.dir={run_dir}")
    assert proc.returncode == 0
    _wait_for_log(slurm_cluster, tmp_path, job_id, f"epoch 2/{epochs} step 4/")
    # What SLURM does --signal=USR1@N seconds before the time limit: signal the job steps.
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
    job = slurm_cluster.wait_for_job(job_id, timeout=400)
    logs = _logs(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED", logs[-4000:]
    assert job["Restarts"] == "1"
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"stopped by SIGUSR1: wrote {hpc}; the job is requeued and resumes from it" in logs
    assert "(restart 1)" in logs
    assert f"resuming from {hpc}" in logs
    ckpt = torch.load(hpc, map_location="cpu", weights_only=True)
    position = ckpt["ImageNetDataModule"]
    assert position["epoch"] == 1 and 4 <= position["batches_done"] <= steps
    assert ckpt["global_step"] == steps + position["batches_done"]
    summary = json.loads((run_dir / "summary.json").read_text())
    # The resumed job continued the step count: no step repeated, none skipped.
    assert summary["global_step"] == epochs * steps and summary["epochs"] == epochs
    assert not list(run_dir.rglob(".*.tmp"))  # no half-written checkpoint left behind


def _records(prefix: Path) -> list[list[dict]]:
    """run.record_samples' lines of ranks 0 and 1."""
    return [[json.loads(line) for line in prefix.with_name(f"{prefix.name}.rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]


def test_usr1_requeued_dali_job_trains_the_samples_of_an_uninterrupted_job(slurm_cluster, tmp_path):
    """dali_cpu, 2 ranks: USR1 -> checkpoint -> requeue -> resume. What each rank trained at each
    step (run.record_samples; one image per class, so the labels are the sample ids), over both
    runs of the requeued job, equals what an uninterrupted job trained."""
    from data_pipelines.sample import make_sample_tree

    root = make_sample_tree(tmp_path / "ids", num_classes=32, train_per_class=1, val_per_class=1, image_size=(32, 32))
    epochs, steps = 16, 32 // (2 * 2)
    job = ["--nodes", "1", "--tasks-per-node", "2", *CPU_JOB, "experiment=smoke", f"data.root={root}",
           "data.backend=dali_cpu", "data.num_workers=1", "data.batch_size=2", f"trainer.max_epochs={epochs}",
           "trainer.log_every_n_steps=2"]
    full_prefix = tmp_path / "full" / "samples"
    proc, full_id = _submit(slurm_cluster, tmp_path, "--wait", *job, f"run.dir={tmp_path / 'full'}",
                            f"run.record_samples={full_prefix}")
    assert proc.returncode == 0, _logs(tmp_path, full_id)[-4000:]

    run_dir, prefix = tmp_path / "run", tmp_path / "run" / "samples"
    proc, job_id = _submit(slurm_cluster, tmp_path, *job, f"run.dir={run_dir}", f"run.record_samples={prefix}")
    assert proc.returncode == 0
    _wait_for_log(slurm_cluster, tmp_path, job_id, f"epoch 2/{epochs} step 4/")
    slurm_cluster.run("scancel", "--signal=USR1", str(job_id))
    state = slurm_cluster.wait_for_job(job_id, timeout=400)
    logs = _logs(tmp_path, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", logs[-4000:]
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'}" in logs
    full, resumed = _records(full_prefix), _records(prefix)
    assert [len(r) for r in full] == [epochs * steps] * 2
    for rank in (0, 1):
        assert resumed[rank] == full[rank]  # same ids, same order, at the same global steps
    # metrics.csv of the requeued job is the whole run: every logged step once, from the first,
    # as the uninterrupted job logged them (and so what `plot` draws).
    for key in ("train/loss_step", "val/top1"):
        assert _csv_steps(run_dir, key) == _csv_steps(tmp_path / "full", key), key
    assert _csv_steps(run_dir, "train/loss_step")[0] < 2  # from the start (logged every 2 steps)


def _csv_steps(run_dir: Path, key: str) -> list[int]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [int(float(row["step"])) for row in csv.DictReader(f) if row.get(key)]


def test_scancel_checkpoints_every_rank_before_the_kill(slurm_cluster, tiny_root, tmp_path):
    """scancel sends SIGTERM, then SIGKILL KillWait (5 s on the test cluster) later: the two ranks
    agree on a step and write the checkpoint in between."""
    run_dir = tmp_path / "run"
    epochs, steps = 40, 64 // (2 * 4)  # fast steps (ResNet-20 at 32 px), enough of them to cancel mid-run
    proc, job_id = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--tasks-per-node", "2", *CPU_JOB,
                           "experiment=smoke", f"data.root={tiny_root}", "data.batch_size=4",
                           f"trainer.max_epochs={epochs}", "trainer.log_every_n_steps=2", f"run.dir={run_dir}")
    assert proc.returncode == 0
    _wait_for_log(slurm_cluster, tmp_path, job_id, f"epoch 2/{epochs} step 4/")
    slurm_cluster.run("scancel", str(job_id))
    job = slurm_cluster.wait_for_job(job_id, timeout=120)
    logs = _logs(tmp_path, job_id)
    assert job["JobState"] == "CANCELLED", logs[-4000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"stopped by SIGTERM: wrote {hpc}" in logs, logs[-4000:]
    ckpt = torch.load(hpc, map_location="cpu", weights_only=True)
    position = ckpt["ImageNetDataModule"]
    assert position["epoch"] >= 1 and ckpt["global_step"] == position["epoch"] * steps + position["batches_done"]
    assert not list(run_dir.rglob(".*.tmp"))


def test_a_two_node_job_stages_a_pack_to_each_nodes_disk_and_a_later_job_reuses_it(slurm_cluster, tiny_pack, tmp_path):
    """data.stage_to on a real 2-node job: each node's first task copies the shards to that node's
    folder (here one per node name, as the test nodes share a disk), the job trains from the copies
    with exact validation, and a later job on the same nodes copies nothing."""
    from data_pipelines import shards

    stage = tmp_path / "local"
    source = shards.read_manifest(tiny_pack)

    def job(name: str) -> tuple[dict, str]:
        run_dir = tmp_path / name
        proc, job_id = _submit(slurm_cluster, tmp_path, "--wait", "--nodes", "2", "--tasks-per-node", "1", *CPU_JOB,
                               "experiment=smoke", f"data.root={tiny_pack}", "data.batch_size=6",
                               f"data.stage_to={stage}/${{oc.env:SLURMD_NODENAME,unknown}}", f"run.dir={run_dir}")
        logs = _logs(tmp_path, job_id)
        assert proc.returncode == 0, logs[-4000:]
        return json.loads((run_dir / "summary.json").read_text()), logs

    summary, logs = job("first")
    assert summary["world_size"] == 2 and summary["val/images"] == 20 and summary["global_step"] == 64 // (2 * 6)
    inodes = {}
    for node in ("node1", "node2"):
        (local,) = (stage / node).glob("imagenet-trainer-*/")
        staged = shards.read_manifest(local)
        for theirs, ours in zip(source.shards(), staged.shards()):
            assert ours.tar.read_bytes() == theirs.tar.read_bytes()
            inodes[ours.tar] = ours.tar.stat().st_ino
    n = len(source.shards())
    assert logs.count(f": {n} shards copied") == 2, logs[-4000:]  # one copier per node, all shards

    summary, logs = job("second")
    assert summary["val/images"] == 20
    assert {path: path.stat().st_ino for path in inodes} == inodes  # verified and reused, not copied
    assert logs.count(f": 0 shards copied (0.00 GB), {n} local copies reused") == 2, logs[-4000:]


# --- requeue after a failure (trainer/cluster/supervise.py) -----------------------------------------


def _err_lines(workdir: Path, job_id: int) -> list[str]:
    return "".join(p.read_text() for p in sorted(workdir.glob(f"slurm-*-{job_id}.err"))).splitlines()


def _by_step(prefix: Path, rank: int) -> dict[int, list[int]]:
    """run.record_samples' labels per global step of one rank; a step trained again after a crash
    keeps its last record (the resumed run's)."""
    path = prefix.with_name(f"{prefix.name}.rank{rank}.jsonl")
    return {r["step"]: r["labels"] for r in map(json.loads, path.read_text().splitlines())}


def _nodes_of_runs(logs: str, job_id: int) -> list[str]:
    """The node list of each run of the job, from the script's first line."""
    return re.findall(rf"job {job_id} \(restart \d+\) on (\S+):", logs)


def test_a_crashed_rank_requeues_the_job_without_its_node_and_it_resumes_exactly(slurm_cluster, tiny_root, tmp_path):
    """1 node x 2 tasks; rank 1 segfaults at step 11 (epoch 1) on the first run only: the supervisor
    records it, requeues the job excluding that node (it runs again on the other one), and the run
    resumes from last.ckpt (step 8) to the step count, and the samples, of an uninterrupted job."""
    epochs, steps = 2, 64 // (2 * 4)
    job = ["--nodes", "1", "--tasks-per-node", "2", *CPU_JOB, "experiment=smoke", f"data.root={tiny_root}",
           "data.batch_size=4", f"trainer.max_epochs={epochs}", "trainer.log_every_n_steps=2"]
    full_prefix = tmp_path / "full" / "samples"
    proc, full_id = _submit(slurm_cluster, tmp_path, "--wait", *job, f"run.dir={tmp_path / 'full'}",
                            f"run.record_samples={full_prefix}")
    assert proc.returncode == 0, _logs(tmp_path, full_id)[-4000:]

    run_dir, prefix = tmp_path / "run", tmp_path / "run" / "samples"
    faulty = dataclasses.replace(slurm_cluster, env={**slurm_cluster.env, "IMAGENET_TRAINER_FAULT": "crash@1:11:0"})
    proc, job_id = _submit(faulty, tmp_path, *job, f"run.dir={run_dir}", f"run.record_samples={prefix}")
    assert proc.returncode == 0
    state = slurm_cluster.wait_for_job(job_id, timeout=400)
    logs = _logs(tmp_path, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", logs[-4000:]
    assert "imagenet-trainer: injected crash on rank 1 at step 11" in logs
    assert re.search(r"srun: error: (node\d): task 1: Segmentation fault", logs), logs[-4000:]
    first, second = _nodes_of_runs(logs, job_id)
    assert first != second and state["ExcNodeList"] == first, (first, second, state)
    rec = [r for r in map(json.loads, (run_dir / "failures.jsonl").read_text().splitlines()) if "decision" in r]
    assert len(rec) == 1, rec
    assert rec[0]["decision"] == "requeue" and rec[0]["host"] == first and rec[0]["rank"] == 1
    assert rec[0]["job"] == str(job_id) and rec[0]["restart"] == 0 and rec[0]["cause"] == "crash"
    assert rec[0]["exit_code"] == 139 and rec[0]["excluded"] == [first]
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in logs, logs[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == epochs * steps
    for rank in (0, 1):
        assert _by_step(prefix, rank) == _by_step(full_prefix, rank)


def test_a_rank_that_fails_on_every_run_stops_after_max_restarts_naming_the_cause(slurm_cluster, tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    env = {**slurm_cluster.env, "IMAGENET_TRAINER_FAULT": "crash@1:3"}
    proc = subprocess.run([sys.executable, "-m", "trainer", "submit", "--nodes", "1", "--tasks-per-node", "2",
                           *CPU_JOB, "experiment=smoke", f"data.root={tiny_root}", "data.batch_size=4",
                           "run.max_restarts=1", f"run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    job_id = int(re.search(r"submitted job (\d+)", proc.stdout).group(1))
    state = slurm_cluster.wait_for_job(job_id, timeout=400)
    logs = _logs(tmp_path, job_id)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "1", logs[-4000:]
    assert logs.count("imagenet-trainer: injected crash on rank 1 at step 3") == 2
    last = _err_lines(tmp_path, job_id)[-1]
    assert last.startswith("imagenet-trainer: not retrying: crash of rank 1 (exit 139): the job was requeued after "
                           "failures 1 time(s) already (run.max_restarts=1)"), last
    assert str(run_dir / "failures.jsonl") in last
    rec = [r for r in map(json.loads, (run_dir / "failures.jsonl").read_text().splitlines()) if "decision" in r]
    assert [(r["decision"], r["restart"], r["cause"]) for r in rec] == [("requeue", 0, "crash"), ("stop", 1, "crash")]


def test_a_failed_health_check_requeues_the_job_without_its_node_and_it_completes(slurm_cluster, tiny_root, tmp_path):
    """1 node x 2 tasks; rank 1's health check fails on the first run only (before any step): it
    exits 11 naming its host, rank 0 exits 12, the supervisor requeues the job excluding that node,
    and the job then trains from scratch to the end on the other node."""
    run_dir = tmp_path / "run"
    faulty = dataclasses.replace(slurm_cluster, env={**slurm_cluster.env, "IMAGENET_TRAINER_FAULT": "health@1:0:0"})
    proc, job_id = _submit(faulty, tmp_path, "--nodes", "1", "--tasks-per-node", "2", *CPU_JOB, "experiment=smoke",
                           f"data.root={tiny_root}", "data.batch_size=4", "trainer.max_epochs=2",
                           f"run.dir={run_dir}")
    assert proc.returncode == 0
    state = slurm_cluster.wait_for_job(job_id, timeout=400)
    logs = _logs(tmp_path, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", logs[-4000:]
    assert re.search(r"srun: error: (node\d): task 1: Exited with exit code 11", logs), logs[-4000:]
    first, second = _nodes_of_runs(logs, job_id)
    assert first != second and state["ExcNodeList"] == first, (first, second, state)
    assert f"health check failed on {first} (rank 1)" in logs, logs[-4000:]
    assert re.search(rf"health check: passed in \d+\.\d+ s on {second} \(rank 1", logs), logs[-4000:]
    records = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    own = [r for r in records if "decision" not in r]
    assert sorted((r["rank"], r["exit_code"], r["host"]) for r in own) == [(0, 12, first), (1, 11, first)], own
    (decision,) = [r for r in records if "decision" in r]
    assert decision["decision"] == "requeue" and decision["cause"] == "node" and decision["exit_code"] == 11
    assert decision["rank"] == 1 and decision["host"] == first and decision["excluded"] == [first]
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 2 * 64 // (2 * 4)
