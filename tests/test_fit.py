"""`imagenet-trainer fit` / `validate` end to end on real JPEGs, as a user runs them."""
from __future__ import annotations

import json

import pytest

from tests.conftest import CPU_FIT, pack_with_cli, run_cli

pytestmark = pytest.mark.slow

# 10 classes: chance is 0.10. Classes share shapes (3 kinds of circle) and colours (3 cyan
# shapes), so a pipeline that loses colour or geometry, or scrambles labels, stays far below.
# Clean runs of this exact setting reached 0.70-0.80 here; 0.45 leaves room for seed noise.
LEARNED_TOP1 = 0.45


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
def test_fit_learns_and_validate_reproduces_its_top1(sample_root, tmp_path, backend):
    """Both CPU backends must clear the same bar on the same data, recipe and seed."""
    run_dir = tmp_path / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={sample_root}", f"run.dir={run_dir}", "trainer.max_epochs=6",
                   "data.batch_size=32", "optim.lr=0.4", "optim.warmup_epochs=1", f"data.backend={backend}",
                   "data.num_workers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["backend"] == backend
    assert summary["val/images"] == 300  # every val image counted once
    assert summary["best/val/top1"] >= LEARNED_TOP1, summary
    assert 0 <= summary["val/top1"] <= summary["val/top5"] <= 1
    assert summary["epochs"] == 6 and summary["global_step"] == 6 * (1200 // 32)
    assert "val top-1" in proc.stdout and summary["best_ckpt"] in proc.stdout
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "metrics.csv").is_file()
    # Non-TTY output is plain log lines (SLURM log files), not a progress bar.
    assert "validation epoch 6" in proc.stdout and "\r" not in proc.stdout

    out = tmp_path / "val.json"
    proc = run_cli("validate", summary["best_ckpt"], "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["images"] == 300
    assert result["top1"] == pytest.approx(summary["best/val/top1"], abs=1e-6)


def test_fit_again_resumes_from_last_ckpt_and_continues_global_step(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [*CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "data.batch_size=8"]
    first = run_cli("fit", *args, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    steps = _summary(run_dir)["global_step"]
    assert steps == 64 // 8

    # A longer schedule than the checkpoint's: allowed explicitly (the cosine is re-derived).
    second = run_cli("fit", *args, "trainer.max_epochs=3", "run.allow_resume_change=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    summary = _summary(run_dir)
    assert summary["global_step"] == 3 * steps and summary["epochs"] == 3

    refused = run_cli("fit", *args, "trainer.max_epochs=4", "run.resume=false")
    assert refused.returncode == 2 and "run.resume" in refused.stderr


def test_fit_from_a_pack_learns_as_from_folders(sample_root, tmp_path):
    """The sample tree packed into tar shards: the same recipe clears the same bar as from folders
    (test_fit_learns_and_validate_reproduces_its_top1), and every val image is counted once."""
    pack = pack_with_cli(sample_root, tmp_path / "pack", "256KB", workers=2)
    run_dir = tmp_path / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={pack}", f"run.dir={run_dir}", "trainer.max_epochs=6",
                   "data.batch_size=32", "optim.lr=0.4", "optim.warmup_epochs=1", "data.backend=dali_cpu",
                   "data.num_workers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["val/images"] == 300
    assert summary["best/val/top1"] >= LEARNED_TOP1, summary
    assert summary["global_step"] == 6 * (1200 // 32)


@pytest.mark.parametrize("source", ["folders", "pack"])
@pytest.mark.parametrize("backend", ["torchvision", "dali_cpu"])
def test_two_process_ddp_counts_every_val_image_once_and_matches_one_process(request, tmp_path, backend, source):
    """From the tree, and from its pack; the pack on dali_cpu is staged to a "local" folder first,
    by rank 0 (Lightning's launcher starts rank 1 later, as a child that waits for the copy)."""
    tiny_root = request.getfixturevalue("tiny_root" if source == "folders" else "tiny_pack")
    staged = ["data.stage_to=" + str(tmp_path / "local")] if (source, backend) == ("pack", "dali_cpu") else []
    run_dir = tmp_path / "ddp"
    # 64 train images, 2 ranks x batch 6: 5 steps each (4 images left over); 20 val images, 10 per
    # rank: batches of 6 and 4 on each, so a padded last batch would count 24.
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "trainer.devices=2",
                   "data.batch_size=6", "trainer.max_epochs=1", f"data.backend={backend}", *staged)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if staged:
        assert proc.stderr.count("shards copied") == 1, proc.stderr[-3000:]
        assert len(list((tmp_path / "local").glob("imagenet-trainer-*/*.tar"))) == len(list(tiny_root.glob("*.tar")))
    summary = _summary(run_dir)
    assert summary["world_size"] == 2
    assert summary["val/images"] == 20
    assert summary["global_step"] == 5
    single = run_cli("validate", summary["best_ckpt"], "--json", str(tmp_path / "v.json"))
    assert single.returncode == 0, single.stderr[-3000:]
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["images"] == 20
    assert result["top1"] == pytest.approx(summary["val/top1"], abs=1e-6)
    if backend == "torchvision":  # validate itself on 2 ranks: one result, printed and written once
        both = run_cli("validate", summary["best_ckpt"], "trainer.devices=2", "--json", str(tmp_path / "v2.json"))
        assert both.returncode == 0, both.stderr[-3000:]
        assert both.stdout.count("top-1 ") == 1, both.stdout
        assert json.loads((tmp_path / "v2.json").read_text())["images"] == 20
