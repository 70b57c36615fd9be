"""bench/gpu_check.sh, the one script a GPU machine runs, checked here as a dry run: without CUDA it
runs every stage with tiny sizes on the CPU, so that a broken stage shows up before a GPU run."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage_and_writes_its_tables(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "dry run" in summary
    for stage in ("construction", "GPU tests", "gpu_throughput", "loop_overhead"):
        assert any(line.startswith(f"| {stage}") and "| ok |" in line for line in summary.splitlines()), summary
    # The construction tests ran (and passed); the GPU tests were skipped with their reason.
    construction = (out / "pytest_construction.txt").read_text()
    assert " passed" in construction and "failed" not in construction
    assert "needs a CUDA GPU" in (out / "pytest_gpu.txt").read_text()
    for table in ("gpu_throughput.md", "gpu_throughput.json", "loop_overhead.md", "loop_overhead.json"):
        assert (out / table).stat().st_size > 0
    assert "| row | model | data |" in summary and "Lightning / plain = " in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last


def test_gpu_check_rejects_an_unknown_argument():
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--bogus"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
