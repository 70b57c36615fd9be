"""Non-finite steps, loss spikes, rollbacks and damaged checkpoints (trainer/cluster/guard.py,
trainer/run.py ``resume_checkpoint``): real fits on tiny generated data, the fault injected with
``IMAGENET_TRAINER_FAULT=nan@RANK:STEP``."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import CPU_FIT, run_cli
from trainer.cluster.guard import RollbackState, Rollback, Diverged, SkipGuard, SpikeDetector

REPO = Path(__file__).resolve().parent.parent


# --- the spike detector and the skip decision (fast) ---------------------------------------------

def test_spike_detector_flags_a_loss_far_above_the_window_and_ignores_non_finite_ones():
    d = SpikeDetector(zscore=6, window=20)
    steady = [2.0 + 0.01 * ((i * 7) % 5) for i in range(20)]
    assert d.add(steady) is None
    assert d.add([2.02, float("nan"), float("inf"), 2.01]) is None  # NaN/inf: the skip's business
    assert d.add([2.0, 2.03, 9.0, 2.0]) == 2
    # Too little history: nothing is a spike yet.
    assert SpikeDetector(zscore=6, window=20).add([1.0, 1.0, 1.01, 50.0]) is None


def test_spike_detector_tolerates_a_decreasing_noisy_loss():
    d = SpikeDetector(zscore=6, window=50)
    losses = [3.0 * math.exp(-i / 100) + 0.05 * math.sin(i * 1.3) for i in range(300)]
    assert d.add(losses) is None


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _optimizers(params):
    from timm.optim import Lamb, Lars

    return {
        "sgd": torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True),
        "adamw": torch.optim.AdamW(params, lr=0.01, foreach=True),
        "lars": Lars(params, lr=0.1, momentum=0.9),
        "lamb": Lamb(params, lr=0.01),
    }


def _step(net, opt, guard, x, poison=False):
    tensors = [p for p in net.parameters()] + [b for b in net.buffers() if b.is_floating_point()]
    guard.save(tensors, opt)
    opt.zero_grad()
    out = net(x)
    if poison:
        out = out * float("nan")
    out.square().mean().backward()
    ok = guard.decide(net.parameters())
    opt.step()
    guard.restore()
    return bool(ok)


def _snapshot(net, opt):
    state = {f"{i}.{k}": v.clone() for i, s in enumerate(opt.state.values()) for k, v in s.items() if torch.is_tensor(v)}
    return {k: v.clone() for k, v in net.state_dict().items()}, state


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars", "lamb"])
def test_a_non_finite_step_changes_no_weight_buffer_or_optimiser_state(name):
    net = _net()
    opt = _optimizers(list(net.parameters()))[name]
    guard = SkipGuard()
    x = torch.randn(16, 4)
    assert _step(net, opt, guard, x)  # a good step: creates the optimiser's state
    weights, state = _snapshot(net, opt)
    assert not _step(net, opt, guard, x, poison=True)
    after_weights, after_state = _snapshot(net, opt)
    for key, value in weights.items():
        if value.is_floating_point():
            torch.testing.assert_close(after_weights[key], value, msg=key)  # BN running stats too
    for key, value in state.items():
        if value.is_floating_point() and value.ndim > 0:
            torch.testing.assert_close(after_state[key], value, msg=key)
    assert _step(net, opt, guard, x)  # and training goes on
    moved, _ = _snapshot(net, opt)
    assert not torch.equal(moved["0.weight"], weights["0.weight"])
    assert all(torch.isfinite(v).all() for v in moved.values() if v.is_floating_point())


def test_a_skipped_first_step_leaves_finite_zero_optimiser_state():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=True)
    guard = SkipGuard()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert not _step(net, opt, guard, torch.randn(8, 4), poison=True)
    for key, value in net.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, before[key], msg=key)
    for s in opt.state.values():
        assert torch.count_nonzero(s["momentum_buffer"]) == 0


def test_rollbacks_stop_as_diverged_after_guard_max_rollbacks():
    state = RollbackState()
    spike = Rollback("a loss spike", step=40, bad_from_step=35, position=(2, 8))
    state.record(spike, resumed_step=32, max_rollbacks=2)
    assert (state.rollbacks, state.skip_to, state.fed_offset) == (1, (2, 8), 8)
    state.record(Rollback("again", step=44, bad_from_step=42, position=(2, 20)), resumed_step=40, max_rollbacks=2)
    with pytest.raises(Diverged, match=r"diverged: .*guard.max_rollbacks=2.*lower optim.lr") as err:
        state.record(Rollback("once more", step=50, bad_from_step=48, position=(3, 1)), resumed_step=48, max_rollbacks=2)
    assert err.value.exit_code == 13


@pytest.mark.parametrize("key, value", [("guard.window", 5), ("guard.max_skips", 0), ("guard.spike_zscore", -1.0),
                                        ("guard.max_rollbacks", -1), ("guard.check_every_n_steps", 0)])
def test_bad_guard_values_name_their_key(key, value):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([f"{key}={value}"])


# --- a damaged newest checkpoint (fast: small files) ---------------------------------------------

def _ckpt(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": step}, path)
    return path


def test_resume_takes_the_newest_loadable_checkpoint_by_step_and_sets_damaged_ones_aside(tmp_path, caplog):
    from trainer.run import resume_checkpoint

    last = _ckpt(tmp_path / "checkpoints" / "last.ckpt", 16)
    _ckpt(tmp_path / "checkpoints" / "best-epoch000.ckpt", 16)
    hpc1 = _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 20)
    hpc2 = _ckpt(tmp_path / "hpc_ckpt_2.ckpt", 30)
    assert resume_checkpoint(tmp_path) == hpc2
    hpc2.write_bytes(hpc2.read_bytes()[:500])  # cut short
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(tmp_path) == hpc1
    assert not hpc2.exists() and (tmp_path / "hpc_ckpt_2.ckpt.damaged").is_file()
    assert "set aside" in caplog.text
    assert resume_checkpoint(tmp_path, at_most_step=18) in (last, tmp_path / "checkpoints" / "best-epoch000.ckpt")
    hpc1.write_bytes(b"garbage")
    last.write_bytes(b"")
    assert resume_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best-epoch000.ckpt"
    assert resume_checkpoint(tmp_path, at_most_step=10) is None


# --- real fits (slow) ----------------------------------------------------------------------------

def _fit(tiny_root, run_dir, *overrides, env=None, timeout=300):
    return run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", "data.batch_size=4", "trainer.limit_val_batches=2",
                   "trainer.log_every_n_steps=1", "logger.wandb.mode=disabled", f"run.dir={run_dir}", *overrides,
                   env=env, timeout=timeout)


def _metric_column(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name) not in (None, "")]


@pytest.mark.slow
def test_consecutive_nan_steps_roll_back_and_the_run_finishes(tiny_root, tmp_path):
    """16 steps an epoch; NaN on steps 20-22 of the data (3 > guard.max_skips=2) -> at the check of
    step 24 a rollback to last.ckpt (step 16), the batches 16-23 of the data are not fed again."""
    run_dir = tmp_path / "run"
    proc = _fit(tiny_root, run_dir, "trainer.max_epochs=2", "guard.max_skips=2", "guard.check_every_n_steps=4",
                f"run.record_samples={tmp_path / 'rec'}", env={"IMAGENET_TRAINER_FAULT": "nan@0:20-22"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rollback 1" in proc.stderr and "3 consecutive steps" in proc.stderr
    assert "last.ckpt" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 24  # 16 + the 8 batches left of epoch 2
    assert _metric_column(run_dir, "guard/rollbacks")[-1] == 1
    assert all(v == 0 for v in _metric_column(run_dir, "guard/skipped_steps"))  # the rows of the bad window are gone
    # The batches fed before the rollback (7 recorded: the 8th raised) are not fed again: the resumed
    # run feeds the epoch's other 8, in order.
    rows = [json.loads(line) for line in (tmp_path / "rec.rank0.jsonl").read_text().splitlines()]
    second = [r["labels"] for r in rows if r["epoch"] == 1]
    before, after = second[:7], second[7:]
    assert len(after) == 8 and [r["step"] for r in rows if r["epoch"] == 1][7:] == list(range(17, 25))
    assert after[:7] != before
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["ImageNetDataModule"] == {"epoch": 1, "batches_done": 16}
    assert all(torch.isfinite(v).all() for v in resumed["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_a_huge_lr_stops_as_diverged_with_exit_code_13(tiny_root, tmp_path):
    proc = _fit(tiny_root, tmp_path / "run", "trainer.max_epochs=1", "optim.lr=1e9", "guard.max_skips=2",
                "guard.check_every_n_steps=4")
    assert proc.returncode == 13, proc.stderr[-4000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "diverged" in last_line and "consecutive steps with non-finite gradients" in last_line
    assert "lower optim.lr" in last_line and "gradient_clip_val" in last_line


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_previous(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    first = _fit(tiny_root, run_dir, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-4000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    second = _fit(tiny_root, run_dir, "trainer.max_epochs=2", "run.allow_resume_change=true")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "set aside" in second.stderr and (run_dir / "checkpoints" / "last.ckpt.damaged").is_file()
    assert f"resuming from {best}" in second.stderr  # not from scratch
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 32
    steps = [int(float(s)) for s in _metric_column(run_dir, "step")]
    assert steps == sorted(steps)  # epoch 1's rows kept, epoch 2's after them


def _two_ranks(tmp_path, tiny_root, fault: str, *mode: str) -> str:
    """tests/_guard_rank.py as 2 DDP ranks (gloo), each its own process group (killed on a hang);
    their logs, once both exited 0."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "IMAGENET_TRAINER_FAULT": fault}
    procs = []
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "_guard_rank.py"), str(tmp_path),
                                           str(rank), str(tiny_root), *mode], cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for p in procs:
            p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    logs = "\n".join(f"--- rank {r}:\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:] for r in (0, 1))
    assert [p.returncode for p in procs] == [0, 0], logs
    return logs


@pytest.mark.slow
def test_nan_on_one_ddp_rank_is_skipped_on_both_and_the_weights_stay_equal(tiny_root, tmp_path):
    logs = _two_ranks(tmp_path, tiny_root, "nan@1:2")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["skipped"] == ranks[1]["skipped"] == 1.0, logs
    assert ranks[0]["step"] == ranks[1]["step"] == 8
    for key, value in ranks[0]["state_dict"].items():
        if value.is_floating_point() and "running" not in key:  # BN statistics are each rank's own
            torch.testing.assert_close(ranks[1]["state_dict"][key], value, msg=key)
        assert torch.isfinite(value).all(), key
    assert _metric_column(tmp_path / "run", "guard/skipped_steps")[-1] == 1


@pytest.mark.slow
def test_nan_steps_on_one_ddp_rank_roll_both_back_at_the_same_step(tiny_root, tmp_path):
    """8 steps an epoch; NaN on rank 1 for the batches fed at steps 11-13 -> at the check of step 14
    both ranks roll back to last.ckpt (step 8) and skip the epoch's first 6 batches."""
    logs = _two_ranks(tmp_path, tiny_root, "nan@1:11-13", "rollback")
    for rank in (0, 1):
        assert "skipped 6 batches of epoch 1" in (tmp_path / f"rank{rank}.log").read_text(), logs
    summary = torch.load(tmp_path / "summary.pt", weights_only=False)
    assert summary["global_step"] == 10 and summary["world_size"] == 2
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["ImageNetDataModule"] == {"epoch": 1, "batches_done": 8}
