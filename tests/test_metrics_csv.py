"""metrics.csv is the run's whole record: a fit stopped by SIGUSR1 and resumed in the same run.dir
keeps the rows written before the stop, drops those written after its checkpoint, and logs every
step once; `plot` draws the run from step 0."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CPU_FIT, REPO, pack_with_cli, run_cli, skip_without_dali
from trainer.metrics_csv import RunCSVLogger


def _rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _steps(rows: list[dict], key: str) -> list[int]:
    return [int(float(r["step"])) for r in rows if r.get(key) not in (None, "")]


def test_a_resumed_writer_keeps_the_rows_before_its_step_and_drops_the_rest(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,loss,step\n0,1.0,0\n0,0.9,1\n0,0.8,2\n0,0.7,3\n")
    logger = RunCSVLogger(tmp_path, resume_step=2)
    logger.log_metrics({"loss": 0.5, "lr": 0.1, "epoch": 0}, step=2)  # a new key: the header grows
    logger.save()
    rows = _rows(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [("0", "1.0"), ("1", "0.9"), ("2", "0.5")]
    assert rows[-1]["lr"] == "0.1" and rows[0]["lr"] == ""
    RunCSVLogger(tmp_path, resume_step=None).experiment  # a fresh run in the folder: a fresh record
    assert not (tmp_path / "metrics.csv").exists()


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen, limit: float = 300) -> None:
    """Until ``path`` holds ``count`` lines (the fit's own record of the batches it trained); the
    limit only guards against a fit that never gets there."""
    deadline = time.monotonic() + limit
    while not (path.is_file() and len(path.read_text().splitlines()) >= count):
        if proc.poll() is not None:
            raise AssertionError(f"the fit exited ({proc.returncode}) before training {count} batches: "
                                 f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not reach {count} lines"
        time.sleep(0.05)


@pytest.mark.parametrize("source", ["folders", "pack"])
@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
@pytest.mark.slow
def test_usr1_then_resume_logs_every_step_once_from_step_0(tiny_root, tmp_path_factory, tmp_path, backend, source):
    if backend == "dali_cpu":
        skip_without_dali()
    root = tiny_root if source == "folders" else pack_with_cli(tiny_root, tmp_path_factory.mktemp("p") / "p", "16KB")
    run_dir = tmp_path / "run"
    fed = tmp_path / "fed"
    args = [*CPU_FIT, f"data.backend={backend}", f"data.root={root}", "data.batch_size=8", "trainer.max_epochs=2",
            "trainer.log_every_n_steps=1", "logger.wandb.mode=disabled", f"run.dir={run_dir}",
            f"run.record_samples={fed}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_lines(Path(f"{fed}.rank0.jsonl"), 11, proc)  # into epoch 1 (8 batches an epoch)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert "hpc_ckpt_1.ckpt" in err, err[-3000:]
    before = _steps(_rows(run_dir), "train/loss_step")
    assert before[0] == 0 and len(before) >= 11
    done = run_cli("fit", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(run_dir)
    assert _steps(rows, "train/loss_step") == list(range(16))  # 2 epochs x 8 steps, each once, in order
    assert _steps(rows, "val/top1") == [7, 15]  # one validation per epoch, the first from before the stop
    from trainer.artifacts.plot import read_metrics

    steps, _ = read_metrics(run_dir / "metrics.csv")["train/loss_step"]
    assert steps[0] == 0 and steps == sorted(set(steps))
