"""SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (SLURM stopping a job) under real
multi-process DDP: every rank checkpoints at the same step, only rank 0 requeues (on USR1), and the
resumed run trains on exactly what an uninterrupted run trains on.
tests/slurm/test_train_on_slurm.py does the same through sbatch."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from data_pipelines.datamodule import ImageNetDataModule
from data_pipelines.specs import DataSpec
from trainer.recipe.models import build_model
from trainer.module import Classifier
from tests.conftest import pack_with_cli, skip_without_dali
from trainer.cluster.preemption import Preempted, RequeueOnSignal, next_hpc_path, requeue_command
from trainer.recipe.specs import OptimSpec

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("_preempt_rank.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ids_root(tmp_path_factory) -> Path:
    """32 classes of one train image each: a batch's labels are the ids of the images in it."""
    from data_pipelines.sample import make_sample_tree

    return make_sample_tree(tmp_path_factory.mktemp("ids"), num_classes=32, train_per_class=1, val_per_class=1,
                            image_size=(32, 32))


@pytest.fixture(scope="module")
def ids_pack(ids_root, tmp_path_factory) -> Path:
    """ids_root packed into shards of about 8 KB (6 images each): ranks read distinct shards."""
    return pack_with_cli(ids_root, tmp_path_factory.mktemp("ids_pack") / "pack", "8KB")


def _needs(backend: str) -> None:
    if backend.startswith("dali"):
        skip_without_dali()


BACKENDS = ["torchvision", "dali_cpu"]


def _run_ranks(root: Path, out: Path, signal_at: str, resume: Path | None = None, timeout: float = 240,
               backend: str = "torchvision") -> list[dict]:
    """Both ranks as separate processes (as srun starts them); their results."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(root), str(out), str(rank), port, signal_at, backend,
                          *([str(resume)] if resume else [])],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own process group: see the kill below
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + timeout
    try:
        logs = [p.communicate(timeout=max(deadline - time.monotonic(), 1))[0] for p in procs]
    except subprocess.TimeoutExpired:
        # Each rank's whole group: a DataLoader worker left alive would hold the pipe open, and
        # reading the logs would then wait for ever.
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        logs = [p.communicate(timeout=60)[0] for p in procs]
        pytest.fail(f"ranks still running after {timeout:.0f}s (a deadlock):\n" + "\n".join(log[-3000:] for log in logs))
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-4000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


_FULL: dict[tuple[str, str], list[dict]] = {}


def _uninterrupted(root: Path, tmp_path_factory, backend: str) -> list[dict]:
    """Both ranks of an uninterrupted job, once per test session (it is deterministic)."""
    if (backend, str(root)) not in _FULL:
        _FULL[backend, str(root)] = _run_ranks(root, tmp_path_factory.mktemp(f"full-{backend}"), "-", backend=backend)
    return _FULL[backend, str(root)]


@pytest.mark.parametrize("source", ["folders", "pack"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_usr1_to_one_rank_stops_both_at_one_step_and_the_resume_is_exact(request, tmp_path, tmp_path_factory, backend,
                                                                         source):
    """The same from a pack (tar shards): ranks read distinct shards, and the resume is as exact."""
    _needs(backend)
    ids_root = request.getfixturevalue("ids_root" if source == "folders" else "ids_pack")
    steps = 32 // (2 * 2)  # 32 train images, 2 ranks x batch 2
    full = _uninterrupted(ids_root, tmp_path_factory, backend)
    assert [r["ended"] for r in full] == ["finished"] * 2
    assert [len(r["seen"]) for r in full] == [2 * steps] * 2
    # DDP steps make no host sync either (Lightning's own per-step SIGTERM broadcast read one back).
    assert all(r["recorded"] > 100 for r in full)
    assert [r["sync_ops"] for r in full] == [[], []]

    # Only rank 1 is signalled, after its batch 2, while rank 0 is elsewhere. Lightning's handler
    # would save (ending in a barrier) on rank 1 alone: a deadlock.
    run = tmp_path / "run"
    first = _run_ranks(ids_root, run, "1:2:USR1", backend=backend)
    ckpt = run / "hpc_ckpt_1.ckpt"
    assert [r["ended"] for r in first] == ["SIGUSR1"] * 2
    assert [r["checkpoint"] for r in first] == [str(ckpt)] * 2
    assert [r["requeued"] for r in first] == [True, True]
    assert [r["exit_code"] for r in first] == [0, 0]
    assert (run / "requeued").read_text() == "0\n"  # rank 0 ran the requeue command, once
    # Rank 1's flag joins the all-reduce started at batch 3 and is read at batch 4's start:
    # both ranks trained batches 0-3 and stopped before batch 4 (which each had already fetched).
    assert [len(r["seen"]) for r in first] == [4, 4]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4
    assert saved["ImageNetDataModule"] == {"epoch": 0, "batches_done": 4}
    assert not list(run.glob(".*.tmp"))

    second = _run_ranks(ids_root, run, "-", resume=ckpt, backend=backend)
    assert [r["ended"] for r in second] == ["finished"] * 2
    ids = [label for rank in (0, 1) for _, _, _, labels in full[rank]["seen"][:steps] for label in labels]
    assert sorted(ids) == list(range(32))  # an epoch: every image once over both ranks
    for rank in (0, 1):  # same sample ids, same order, same global steps as without the stop
        assert first[rank]["seen"] + second[rank]["seen"] == full[rank]["seen"]
        assert second[rank]["global_step"] == 2 * steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_on_both_without_a_requeue_and_resumes_exactly(ids_root, tmp_path,
                                                                                        tmp_path_factory, backend):
    _needs(backend)
    ranks = _run_ranks(ids_root, tmp_path, "0:0:TERM", backend=backend)  # rank 0, after its first batch
    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    assert [r["ended"] for r in ranks] == ["SIGTERM"] * 2
    assert [r["checkpoint"] for r in ranks] == [str(ckpt)] * 2
    assert [r["requeued"] for r in ranks] == [False, False]
    assert [r["exit_code"] for r in ranks] == [143, 143]
    assert not (tmp_path / "requeued").exists()  # SLURM decides whether a stopped job comes back
    assert [len(r["seen"]) for r in ranks] == [2, 2]
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["ImageNetDataModule"] == {"epoch": 0, "batches_done": 2}

    resumed = _run_ranks(ids_root, tmp_path / "resumed", "-", resume=ckpt, backend=backend)
    full = _uninterrupted(ids_root, tmp_path_factory, backend)
    for rank in (0, 1):  # same sample ids, same order, same global steps as without the stop
        assert ranks[rank]["seen"] + resumed[rank]["seen"] == full[rank]["seen"]


class _SignalSelf(pl.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def _one_process_fit(root, run_dir, requeue):
    dm = ImageNetDataModule(DataSpec(root=str(root), backend="torchvision", batch_size=8, image_size=32,
                                     val_resize=32, num_workers=0, seed=0, filelist_cache=False), on_gpu=False)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, use_distributed_sampler=False, default_root_dir=str(run_dir),
                         callbacks=[RequeueOnSignal(run_dir, requeue=requeue), _SignalSelf()])
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as stopped:
        trainer.fit(Classifier(build_model("resnet20", 4), num_classes=4, batch_size=8,
                                optim=OptimSpec(lr=0.1, momentum=0.9)), dm)
    # Lightning's teardown put back this process's handlers.
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
    return trainer, stopped.value


def test_one_process_stops_at_the_next_step_and_a_failed_requeue_is_reported(tiny_root, tmp_path):
    trainer, stop = _one_process_fit(tiny_root, tmp_path, requeue=[sys.executable, "-c", "import sys; sys.exit(7)"])
    assert trainer.global_step == 2  # signalled after batch 1; no all-reduce to wait for
    assert stop.checkpoint == tmp_path / "hpc_ckpt_1.ckpt" and stop.checkpoint.is_file()
    assert not stop.requeued and "exited 7" in stop.reason and stop.exit_code == 3
    assert f"resubmit with run.dir={tmp_path}" in str(stop)


def test_requeue_command_names_the_job_or_the_array_task():
    assert requeue_command({"SLURM_JOB_ID": "1234"}) == ["scontrol", "requeue", "1234"]
    env = {"SLURM_JOB_ID": "1240", "SLURM_ARRAY_JOB_ID": "1234", "SLURM_ARRAY_TASK_ID": "6"}
    assert requeue_command(env) == ["scontrol", "requeue", "1234_6"]
    with pytest.raises(ValueError, match="unexpected SLURM job id"):
        requeue_command({"SLURM_JOB_ID": "12; rm -rf /"})


def test_next_hpc_path_counts_up_from_the_newest(tmp_path):
    assert next_hpc_path(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    for n in (1, 2, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    assert next_hpc_path(tmp_path) == tmp_path / "hpc_ckpt_11.ckpt"
