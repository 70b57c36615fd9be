"""`imagenet-trainer predict` names the classes of sample images for a model trained on them;
`imagenet-trainer plot` draws the run's own metrics.csv into a real PNG."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import CPU_FIT, run_cli

# 3 classes: chance is 0.33. Clean runs of this setting reached 0.90-0.93 val top-1 here.
LEARNED = 0.7


@pytest.fixture(scope="module")
def sample3(tmp_path_factory) -> Path:
    """A 3-class sample tree (the generator of `imagenet-trainer sample-data`)."""
    from data_pipelines.sample import make_sample_tree

    return make_sample_tree(tmp_path_factory.mktemp("sample3"), num_classes=3, train_per_class=64,
                            val_per_class=10, image_size=(40, 32))


@pytest.fixture(scope="module")
def run_dir(sample3, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("predict") / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={sample3}", f"run.dir={run_dir}", "trainer.max_epochs=4",
                   "data.batch_size=16", "optim.lr=0.4", "optim.warmup_epochs=1", "trainer.log_every_n_steps=4",
                   "logger.wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_predict_names_the_class_of_sample_images(run_dir, sample3):
    val = sample3 / "val"
    one_file = sorted((val / "n00000002").iterdir())[0]
    proc = run_cli("predict", str(run_dir / "checkpoints" / "last.ckpt"), str(val), str(one_file),
                   "--topk", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    files = sorted(val.rglob("*.JPEG"))
    assert [r["path"] for r in results] == [str(f) for f in files] + [str(one_file)]
    for r in results:
        assert len(r["topk"]) == 2 and r["topk"][0]["prob"] >= r["topk"][1]["prob"]
        assert 0 < sum(t["prob"] for t in r["topk"]) <= 1 + 1e-6
    right = [r["topk"][0]["class"] == Path(r["path"]).parent.name for r in results[:-1]]
    assert sum(right) / len(right) >= LEARNED, results
    # The same file twice gives the same answer.
    assert results[-1]["topk"] == [r for r in results if r["path"] == str(one_file)][0]["topk"]


@pytest.mark.slow
def test_predict_text_output_and_a_bad_file(run_dir, sample3, tmp_path, capsys):
    from trainer.cli import main

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = sorted((sample3 / "val" / "n00000000").iterdir())[0]
    assert main(["predict", str(run_dir / "checkpoints" / "last.ckpt"), str(good), str(bad), "--topk", "1"]) == 1
    out, err = capsys.readouterr()
    first, second = out.strip().splitlines()
    assert first.startswith(f"{good}  n0000000") and second.startswith(f"{bad}  ERROR")
    assert "broken.jpg" in second and "1 of 2 files could not be read" in err
    assert main(["predict", str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "missing")]) == 2


def _csv_series(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The metrics file read independently of trainer.artifacts.plot."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("epoch", "step") and value:
                    out.setdefault(key, ([], []))
                    out[key][0].append(int(row["step"]))
                    out[key][1].append(float(value))
    return out


@pytest.mark.slow
def test_plot_draws_the_runs_own_metrics_into_a_png(run_dir, tmp_path):
    from PIL import Image

    from trainer.artifacts.plot import plot_run

    proc = run_cli("plot", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    png = run_dir / "metrics.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with Image.open(png) as img:
        assert img.size == (1200, 800)
        assert len(img.convert("RGB").getcolors(1 << 20)) > 50  # curves, text and legends, not a blank canvas

    out, drawn = plot_run(run_dir, tmp_path / "again.png")
    expected = _csv_series(run_dir / "metrics.csv")
    for key in ("train/loss_step", "val/top1", "val/top5", "lr", "perf/images_per_sec", "perf/images_per_sec_total"):
        steps, values = drawn[key]
        assert steps == expected[key][0] and values == pytest.approx(expected[key][1], rel=1e-9), key
    assert drawn["train/loss_step"][0] == list(range(3, 48, 4))  # every 4th of 4 x 12 steps
    assert drawn["val/top1"][0] == [11, 23, 35, 47]
    # The CLI's PNG is the same picture as the one drawn from these series.
    with Image.open(png) as a, Image.open(out) as b:
        assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def test_plot_of_a_folder_without_metrics_names_it(tmp_path, capsys):
    from trainer.cli import main

    assert main(["plot", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.csv'} does not exist" in capsys.readouterr().err
