"""`imagenet-trainer study degradation`: the recipes, the report read from each run's metrics.csv,
one SLURM job per net, and the whole study end to end on a tiny budget."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest
from torch import nn

from trainer.cli import main
from trainer.config import load_config
from trainer.module import Classifier
from trainer.recipe.specs import OptimSpec
from trainer.artifacts.study import STUDIES, read_curves, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _logged_errors(csv_path: Path) -> dict[str, dict[int, float]]:
    """1 - top-1 per epoch (1-based) as the run logged it, read independently of trainer.artifacts.study."""
    out: dict[str, dict[int, float]] = {"train": {}, "val": {}}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            for key, split in (("train/top1_epoch", "train"), ("val/top1", "val")):
                if row.get(key):
                    out[split][int(row["epoch"]) + 1] = 1.0 - float(row[key])
    return out


def _per_epoch_table(md: str) -> dict[str, dict[str, dict[int, float]]]:
    """study.md's per-epoch table as {arch: {split: {epoch: error}}}."""
    section = md.split("## Per epoch", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    table: dict[str, dict[str, dict[int, float]]] = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name, cell in zip(header[1:], cells[1:]):
            arch, split = name.split()
            if cell != "–":
                table.setdefault(arch, {}).setdefault(split, {})[int(cells[0])] = float(cell)
    return table


def _png_pixels(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


# --- the recipes --------------------------------------------------------------------------------


def test_cifar_recipe_is_the_papers_figure_6_setting():
    cfg = load_config(["experiment=degradation_cifar", "data.root=/x"])
    assert cfg.data.batch_size == 128 and cfg.data.image_size == 32
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4 and cfg.optim.label_smoothing == 0.0
    # optim.lr is per 256 images: the run's lr at batch 128 on one device is the paper's 0.1.
    module = Classifier(nn.Linear(2, 2), num_classes=2, batch_size=cfg.data.batch_size,
                        optim=OptimSpec(lr=cfg.optim.lr, momentum=cfg.optim.momentum))
    assert module.peak_lr() == pytest.approx(0.1)
    assert STUDIES["degradation"]["degradation_cifar"] == ("plain20", "plain56", "resnet20", "resnet56")


def test_imagenet_recipe_is_the_papers_figure_4_setting():
    cfg = load_config(["experiment=degradation_imagenet", "data.root=/x"])
    assert cfg.data.image_size == 224 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.label_smoothing == 0.0
    # lr 0.1 at the paper's 256 images (8 devices x 32).
    assert cfg.optim.lr * (8 * cfg.data.batch_size) / 256 == pytest.approx(0.1)
    assert STUDIES["degradation"]["degradation_imagenet"] == ("plain18", "plain34", "resnet18", "resnet34")


# --- the report, from metrics.csv files as Lightning's CSVLogger writes them ---------------------


def _fake_run(run_dir: Path, arch: str, train_top1: list[float], val_top1: list[float]) -> None:
    """A metrics.csv in CSVLogger's shape: step rows, then a val row and a train-epoch row per epoch."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"model:\n  arch: {arch}\nseed: 0\nexperiment: degradation_cifar\n")
    cols = ["epoch", "lr", "step", "train/loss_step", "train/top1_step", "train/top1_epoch", "val/top1"]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for epoch, (t, v) in enumerate(zip(train_top1, val_top1)):
            w.writerow({"epoch": epoch, "lr": 0.1, "step": epoch * 10 + 4, "train/loss_step": 2.0,
                        "train/top1_step": 0.5})
            w.writerow({"epoch": epoch, "step": epoch * 10 + 9, "val/top1": v})
            w.writerow({"epoch": epoch, "step": epoch * 10 + 9, "train/top1_epoch": t})


def test_report_groups_split_rows_by_epoch_and_states_the_depth_gaps(tmp_path):
    _fake_run(tmp_path / "plain20", "plain20", [0.4, 0.6, 0.7], [0.45, 0.6, 0.65])
    _fake_run(tmp_path / "plain56", "plain56", [0.3, 0.5, 0.65], [0.35, 0.5, 0.6])
    _fake_run(tmp_path / "resnet20", "resnet20", [0.45, 0.62, 0.72], [0.5, 0.6, 0.66])
    _fake_run(tmp_path / "resnet56", "resnet56", [0.5, 0.66, 0.8], [0.5, 0.65, 0.7])

    curves = read_curves(tmp_path / "plain56")
    assert curves.arch == "plain56" and not curves.residual and curves.depth == 56
    assert curves.train_epochs == [1, 2, 3] and curves.train_error == pytest.approx([0.7, 0.5, 0.35])
    assert curves.val_error == pytest.approx([0.65, 0.5, 0.4])

    summary = write_report(tmp_path)  # the runs found under tmp_path, in legend order
    assert summary["archs"] == ["plain20", "plain56", "resnet20", "resnet56"]
    assert summary["plain_gap"]["train_gap"] == pytest.approx(0.05)
    assert summary["plain_gap"]["epochs_b_higher"] == 3
    assert summary["residual_gap"]["train_gap"] == pytest.approx(-0.08)
    md = (tmp_path / "study.md").read_text()
    assert "The paper's pattern is reproduced" in md
    assert ("plain56's training error minus plain20's after epoch 3 = +0.0500 (higher, as degradation predicts); "
            "plain56's was the higher one in 3 of 3 epochs") in md
    assert "resnet56's training error minus plain56's after epoch 3 = -0.1500" in md
    # The figure draws exactly the logged numbers: plain dashed, residual solid.
    assert summary["drawn"]["plain56"]["train"] == pytest.approx([0.7, 0.5, 0.35])
    assert summary["drawn"]["resnet56"]["val"] == pytest.approx([0.5, 0.35, 0.3])
    assert _png_pixels(tmp_path / "study.png").std() > 0


def test_runs_still_training_are_compared_at_the_last_epoch_both_reached(tmp_path):
    _fake_run(tmp_path / "plain20", "plain20", [0.4, 0.6, 0.9], [0.4, 0.6, 0.9])
    _fake_run(tmp_path / "plain56", "plain56", [0.3, 0.5], [0.3, 0.5])  # one epoch behind
    summary = write_report(tmp_path)
    assert summary["plain_gap"]["epoch"] == 2 and summary["plain_gap"]["train_gap"] == pytest.approx(0.1)
    table = _per_epoch_table((tmp_path / "study.md").read_text())
    assert table["plain56"]["train"] == pytest.approx({1: 0.7, 2: 0.5})  # no value for epoch 3


def test_plot_only_without_runs_exits_2_naming_the_folder(tmp_path, capsys):
    assert main(["study", "degradation", "--plot-only", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_another_recipe_needs_archs_and_unknown_archs_are_named(tmp_path, capsys):
    assert main(["study", "degradation", "experiment=smoke", "data.root=/x"]) == 2
    assert "--archs" in capsys.readouterr().err
    assert main(["study", "degradation", "--archs", "plain20,vgg16", "data.root=/x"]) == 2
    assert "vgg16" in capsys.readouterr().err


# --- SLURM: one job per net ---------------------------------------------------------------------


def test_submit_dry_run_renders_one_job_per_net_into_its_own_run_dir(tmp_path, capsys):
    code = main(["study", "degradation", "--submit", "--dry-run", "--gpus-per-node", "4", "--time", "12:00:00",
                 "--partition", "gpu", "data.root=/datasets/cifar", f"run.dir={tmp_path}/study"])
    assert code == 0
    out = capsys.readouterr().out
    scripts = out.split("#!/bin/bash")[1:]
    assert len(scripts) == 4
    for arch, script in zip(("plain20", "plain56", "resnet20", "resnet56"), scripts):
        assert f"#SBATCH --job-name=degradation-{arch}" in script
        assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --partition=gpu" in script
        assert "#SBATCH --time=12:00:00" in script
        assert f"model.arch={arch} run.dir={tmp_path}/study/{arch}" in script
        assert "experiment=degradation_cifar" in script
    assert not (tmp_path / "study").exists()  # a dry run writes nothing


def test_submit_sends_each_job_to_sbatch_and_says_how_to_plot(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/bash\necho "$@" >> {log}\necho $((1000 + $(wc -l < {log})))\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    study = tmp_path / "study"
    code = main(["study", "degradation", "--submit", "--archs", "plain20,plain56", "--gpus-per-node", "0",
                 "data.root=/x", f"run.dir={study}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "submitted job 1001" in out and "submitted job 1002" in out
    assert f"--plot-only {study}" in out
    for arch in ("plain20", "plain56"):
        (script,) = (study / arch).glob("*.sbatch")  # each job's script kept beside its run
        text = script.read_text()
        assert f"model.arch={arch}" in text and "trainer.accelerator=cpu" in text
    assert len(log.read_text().splitlines()) == 2


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_trains_each_net_alike_and_writes_a_real_png_and_the_logged_numbers(tiny_root, tmp_path, capfd):
    study = tmp_path / "study"
    # In this process (the nets train in child `fit` processes either way): one interpreter less to start.
    code = main(["study", "degradation", "--archs", "plain20,resnet20", f"data.root={tiny_root}",
                 f"run.dir={study}", "trainer.max_epochs=1", "data.batch_size=16", "data.backend=torchvision",
                 "data.num_workers=0", "trainer.accelerator=cpu", "logger.wandb.mode=disabled",
                 "trainer.log_every_n_steps=2"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    assert f"wrote {study / 'study.md'} and {study / 'study.png'}" in out
    assert "[study 1/2] plain20: training" in out and "[study 2/2] resnet20: training" in out

    # Same recipe, seed and data for both nets; each in its own run directory.
    saved = {a: (study / a / "config.yaml").read_text() for a in ("plain20", "resnet20")}
    for arch, text in saved.items():
        assert f"arch: {arch}" in text and f"dir: {study / arch}" in text
    strip = {a: re.sub(r"(arch|dir): .*", "", t) for a, t in saved.items()}
    assert strip["plain20"] == strip["resnet20"]

    pixels = _png_pixels(study / "study.png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0

    md = (study / "study.md").read_text()
    table = _per_epoch_table(md)
    for arch in ("plain20", "resnet20"):
        logged = _logged_errors(study / arch / "metrics.csv")
        assert set(logged["train"]) == set(logged["val"]) == {1}
        for split in ("train", "val"):
            assert table[arch][split] == pytest.approx(logged[split], abs=5e-5)
        # The summary table's final errors are the last epoch's.
        (row,) = [line for line in md.splitlines() if line.startswith(f"| {arch} |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[4]) == pytest.approx(logged["train"][1], abs=5e-5)
        assert float(cells[5]) == pytest.approx(logged["val"][1], abs=5e-5)

    # Drawing again from the finished runs gives the same table, and trains nothing.
    before = md
    assert main(["study", "degradation", "--plot-only", str(study)]) == 0
    assert (study / "study.md").read_text() == before
