"""The job supervisor's decisions (trainer/cluster/supervise.py), without a cluster: srun's error
lines, retry or not, the scontrol commands, the job's last line, the failure record."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.cluster import exits, supervise as sv
from trainer.cluster.supervise import TaskFailure


@pytest.mark.parametrize("line, hosts, tasks, code, signalled", [
    ("srun: error: node2: task 1: Exited with exit code 1", ("node2",), (1,), 1, False),
    ("srun: error: node1: tasks 0-1: Exited with exit code 2\n", ("node1",), (0, 1), 2, False),
    ("srun: error: node2: task 1: Killed", ("node2",), (1,), 137, True),
    ("srun: error: gpu07: tasks 0,2-3: Segmentation fault (core dumped)", ("gpu07",), (0, 2, 3), 139, True),
    ("srun: error: node[1-2]: tasks 0-3: Terminated", ("node1", "node2"), (0, 1, 2, 3), 143, True),
    ("srun: error: node3: task 5: Aborted", ("node3",), (5,), 134, True),
])
def test_srun_error_lines_parse(line, hosts, tasks, code, signalled):
    assert sv.parse_srun_line(line) == TaskFailure(hosts, tasks, code, signalled)


@pytest.mark.parametrize("line", [
    "srun: error: Unable to create step for job 7: Invalid generic resource (gres) specification",
    "srun: Job step aborted: Waiting up to 32 seconds for job step to finish.",
    "epoch 2/6 step 4/8 loss 1.2",
])
def test_other_lines_are_not_failures(line):
    assert sv.parse_srun_line(line) is None


def test_hostlists_expand():
    assert sv.expand_hostlist("node[1-3,7],gpu01,x[08-10]") == ["node1", "node2", "node3", "node7", "gpu01",
                                                                "x08", "x09", "x10"]
    assert sv.excluded_nodes({"ExcNodeList": "(null)"}) == []
    assert sv.excluded_nodes({"ExcNodeList": "node[1-2]"}) == ["node1", "node2"]


def _f(code, task=1, host="node2", signalled=False):
    return TaskFailure((host,), (task,), code, signalled)


def test_the_primary_failure_is_the_rank_that_failed_not_the_ones_srun_killed_or_that_lost_it():
    crash = _f(1, task=1, host="node2")
    killed = _f(137, task=0, host="node1", signalled=True)
    peer = _f(12, task=0, host="node1")
    assert sv.primary([killed, crash]) == crash
    assert sv.primary([peer, crash]) == crash
    assert sv.primary([_f(10, 3, "node4"), peer]).code == 10  # the hung rank, not the one it left waiting
    # A cause a retry cannot fix wins over a crash (a config error on one rank, a crash on another).
    assert sv.primary([crash, _f(2, 0, "node1")]).code == 2
    assert sv.primary([killed]) == killed  # the OOM killer: only the kill is known
    assert sv.primary([]) is None


@pytest.mark.parametrize("code, retry", [(1, True), (10, True), (11, True), (139, True), (137, True),
                                         (2, False), (13, False), (3, False), (143, False)])
def test_retry_by_code(code, retry):
    d = sv.decide(_f(code), code, retries_done=0, max_restarts=3)
    assert d.retry is retry
    assert d.exit.code == code
    assert d.host == "node2" and d.exclude == ("node2" if retry else None)


def test_retry_is_bounded_by_max_restarts():
    assert sv.decide(_f(1), 1, 2, 3).retry
    d = sv.decide(_f(1), 1, 3, 3)
    assert not d.retry and "run.max_restarts=3" in d.reason
    assert not sv.decide(_f(1), 1, 0, 0).retry


def test_a_lost_peer_retries_without_excluding_its_node():
    d = sv.decide(_f(12), 12, 0, 3)
    assert d.retry and d.host == "node2" and d.exclude is None


def test_nccls_abort_of_a_waiting_rank_is_a_lost_peer_not_the_culprit():
    """Under NCCL (TORCH_NCCL_ASYNC_ERROR_HANDLING=3) a rank whose collective timed out is aborted
    (SIGABRT, 134) by NCCL's watchdog, with no Python exception: its node is not the bad one."""
    aborted = _f(134, task=0, host="node1", signalled=True)
    crash = _f(139, task=1, host="node2", signalled=True)
    assert sv.primary([aborted, crash]) == crash
    d = sv.decide(aborted, 134, 0, 3)  # the hung rank was killed by srun: only the aborts are known
    assert d.retry and d.exclude is None


def test_no_task_line_decides_by_sruns_code():
    d = sv.decide(None, 1, 0, 3)
    assert d.retry and d.host is None and d.exclude is None and d.rank is None


def test_exclusion_keeps_the_nodes_excluded_before():
    assert sv.exclude_command("42", ["node1", "node3"], "node2") == [
        "scontrol", "update", "JobId=42", "ExcNodeList=node1,node3,node2"]
    assert sv.exclude_command("42", ["node2"], "node2")[-1] == "ExcNodeList=node2"
    assert sv.exclude_command("42", [], "gpu7")[-1] == "ExcNodeList=gpu7"


def test_last_line_names_the_cause_and_what_to_do():
    d = sv.decide(_f(2, task=0), 2, 0, 3)
    assert sv.last_line(d, "/runs/x") == (
        "imagenet-trainer: not retrying: config of rank 0 (exit 2): fix the config or data error named above "
        "and resubmit; see /runs/x/failures.jsonl")
    assert sv.last_line(sv.decide(_f(13), 13, 0, 3), None).startswith(
        "imagenet-trainer: not retrying: diverged of rank 1 (exit 13): the losses diverged")
    line = sv.last_line(sv.decide(_f(1), 1, 1, 1), "r")
    assert line.startswith("imagenet-trainer: not retrying: crash of rank 1 (exit 1): the job was requeued after "
                           "failures 1 time(s) already (run.max_restarts=1)")


def test_requeues_are_counted_from_failures_jsonl_per_job():
    recs = [{"job": "7", "decision": "requeue"}, {"job": "7", "decision": "stop"}, {"job": 8, "decision": "requeue"},
            {"job": "7", "cause": "crash"}, {"job": "7", "decision": "requeue"}]
    assert sv.failure_requeues(recs, "7") == 2 and sv.failure_requeues(recs, "9") == 0


@pytest.mark.slow  # loading the config imports torch (about 8 s); and it names a CLI fit's argv
def test_fit_overrides_and_run_settings(tmp_path):
    cmd = ["srun", "--kill-on-bad-exit=1", sys.executable, "-m", "trainer", "fit", f"run.dir={tmp_path}/a",
           "run.hang_timeout_s=1800", "experiment=smoke", "run.max_restarts=1"]
    overrides = sv._fit_overrides(cmd)
    assert overrides == [f"run.dir={tmp_path}/a", "run.hang_timeout_s=1800", "experiment=smoke",
                         "run.max_restarts=1"]
    assert sv.run_settings(overrides) == (f"{tmp_path}/a", 1)
    assert sv.run_settings([f"run.dir={tmp_path}/b", "nope.key=1", "run.max_restarts=5"]) == (f"{tmp_path}/b", 5)
    assert sv._fit_overrides(["srun", "hostname"]) is None
    assert sv.run_settings(None) == (None, 3)


def test_a_stop_is_recorded_in_failures_jsonl_and_printed_last(tmp_path, capsys):
    env = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    code = sv.handle_failure(2, [_f(137, 0, "node1", True), _f(2, 1, "node2")], [f"run.dir={tmp_path}"], env)
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("imagenet-trainer: not retrying: config of rank 1 (exit 2)")
    (rec,) = [json.loads(l) for l in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert rec["job"] == "77" and rec["restart"] == 1 and rec["host"] == "node2" and rec["rank"] == 1
    assert rec["exit_code"] == 2 and rec["cause"] == "config" and rec["decision"] == "stop"


def test_supervise_passes_output_through_and_exits_with_the_code(tmp_path):
    """A fake srun that prints, fails a task, and exits 2: the output comes through unchanged, the
    last line names the cause, the code is the task's."""
    script = ("import sys; print('out line'); sys.stdout.flush(); "
              "print('rank says hi', file=sys.stderr); "
              "print('srun: error: node2: task 1: Exited with exit code 2', file=sys.stderr); sys.exit(2)")
    proc = subprocess.run([sys.executable, "-m", "trainer.cluster.supervise", "--", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5", "TORCH_FR_DUMP_TEMP_FILE": "x"})
    assert proc.returncode == 2
    assert proc.stdout == "out line\n"
    lines = proc.stderr.splitlines()
    assert lines[:2] == ["rank says hi", "srun: error: node2: task 1: Exited with exit code 2"]
    assert lines[-1].startswith("imagenet-trainer: not retrying: config of rank 1 (exit 2)")


def test_exits_table_drives_retry():
    assert {e.cause for e in exits.TABLE if e.retry} == {"crash", "hang", "node", "peer"}


def _fake_slurm(tmp_path: Path, job: str, nodes: list[str]) -> tuple[dict, Path]:
    """``scontrol`` (``show job`` prints ``job``) and ``sinfo`` (prints ``nodes``) on PATH, each
    logging its arguments to the returned file; the job's environment."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"scontrol $*\" >> {log}\n"
                                      f"if [ \"$1\" = show ]; then echo '{job}'; fi\n")
    (bin_dir / "sinfo").write_text(f"#!/bin/sh\necho \"sinfo $*\" >> {log}\nprintf '%s\\n' {' '.join(nodes)}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "9"}, log


def test_a_retry_requeues_then_excludes_the_node_and_records_it(tmp_path, capsys):
    """Fake scontrol/sinfo on PATH log their arguments: the requeue comes first (SLURM takes
    ExcNodeList from a pending job only), the exclusion keeps node1, the record says so."""
    env, log = _fake_slurm(tmp_path, "JobId=9 JobName=x Partition=debug NumNodes=1 ExcNodeList=node1 Command=a b",
                           ["node1", "node2", "node3"])
    run_dir = tmp_path / "run"
    code = sv.handle_failure(139, [_f(139, 1, "node2", True), _f(137, 0, "node2", True)],
                             [f"run.dir={run_dir}", "run.max_restarts=2"], env)
    assert code == 0
    calls = log.read_text().splitlines()
    assert calls == ["scontrol show job -o 9", "sinfo -h -N -p debug -o %N", "scontrol requeue 9",
                     "scontrol update JobId=9 ExcNodeList=node1,node2"]
    (rec,) = [json.loads(l) for l in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert rec["decision"] == "requeue" and rec["excluded"] == ["node1", "node2"] and rec["host"] == "node2"
    assert rec["exit_code"] == 139 and rec["cause"] == "crash" and rec["restart"] == 0
    assert "retry 1 of run.max_restarts=2" in capsys.readouterr().err
    # The next failure of the job, on another node: its second retry; the third is refused.
    assert sv.handle_failure(1, [_f(1, 1, "node3")], [f"run.dir={run_dir}", "run.max_restarts=2"], env) == 0
    assert sv.handle_failure(1, [_f(1, 1, "node3")], [f"run.dir={run_dir}", "run.max_restarts=2"], env) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "imagenet-trainer: not retrying: crash of rank 1 (exit 1): the job was requeued after failures 2 time(s)")


def test_no_exclusion_when_the_partition_would_have_too_few_nodes(tmp_path, capsys):
    env, log = _fake_slurm(tmp_path, "JobId=9 Partition=debug NumNodes=2 ExcNodeList=(null)", ["node1", "node2"])
    assert sv.handle_failure(1, [_f(1, 1, "node2")], [f"run.dir={tmp_path / 'run'}"], env) == 0
    assert log.read_text().splitlines() == ["scontrol show job -o 9", "sinfo -h -N -p debug -o %N", "scontrol requeue 9"]
    assert "not excluding node2: the job needs 2 node(s) and its partition would have 1" in capsys.readouterr().err
