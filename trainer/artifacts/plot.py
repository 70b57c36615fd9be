"""Training curves from ``RUN_DIR/metrics.csv`` into a PNG: ``imagenet-trainer plot RUN_DIR``.

For air-gapped clusters and a quick look from a terminal: the CSV is written by every fit, with or
without W&B. Four panels against the global step: loss, top-1/top-5, learning rate, images/s
(with the fraction of time waiting for data on a second axis).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

# Panel title -> the metric keys drawn in it (keys absent from the file are skipped).
PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss_step", "train/loss_epoch", "val/loss"),
    "accuracy": ("train/top1_step", "train/top1_epoch", "val/top1", "val/top5"),
    "learning rate": ("lr",),
    "images/s": ("perf/images_per_sec_total", "perf/images_per_sec"),
}
SECONDARY = {"images/s": ("perf/data_wait_frac",)}  # drawn on a right-hand axis (0..1)

Series = tuple[list[int], list[float]]


def metrics_file(run_dir: str | Path) -> Path:
    """``RUN_DIR/metrics.csv`` (or the CSV itself when given one)."""
    path = Path(run_dir)
    csv_path = path if path.suffix == ".csv" else path / "metrics.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"{csv_path} does not exist: plot takes a run directory written by `imagenet-trainer fit` "
            f"(its run.dir, which holds metrics.csv)"
        )
    return csv_path


def read_metrics(csv_path: str | Path) -> dict[str, Series]:
    """Every metric column of Lightning's CSV as (steps, values), sorted by step; empty cells
    (a row logs only some metrics) are skipped."""
    series: dict[str, Series] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                number = float(value)
                if math.isfinite(number):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(int(float(step)))
                    values.append(number)
    for key, (steps, values) in series.items():
        order = sorted(range(len(steps)), key=steps.__getitem__)  # stable: resumed runs keep their order
        series[key] = ([steps[i] for i in order], [values[i] for i in order])
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, Series]]:
    """Draw the run's curves into ``out`` (default ``RUN_DIR/metrics.png``).

    Returns the PNG's path and the series drawn, read back from the plotted lines themselves.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    csv_path = metrics_file(run_dir)
    series = read_metrics(csv_path)
    if not series:
        raise ValueError(f"{csv_path} holds no metric values yet: plot again after the first logged steps")
    out = Path(out) if out is not None else csv_path.with_name("metrics.png")

    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    drawn: dict[str, Series] = {}
    for ax, (title, keys) in zip(axes, PANELS.items()):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        for key in keys:
            if key in series:
                style = "-" if key.endswith("_step") or not key.startswith(("train/", "val/")) else "o-"
                (line,) = ax.plot(*series[key], style, label=key, markersize=3)
                drawn[key] = (list(map(int, line.get_xdata())), list(map(float, line.get_ydata())))
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        handles, labels = ax.get_legend_handles_labels()
        for key in SECONDARY.get(title, ()):
            if key in series:
                twin = ax.twinx()
                twin.set_ylim(0, 1)
                twin.set_ylabel("fraction of time waiting for data")
                (line,) = twin.plot(*series[key], ":", color="grey", label=key)
                drawn[key] = (list(map(int, line.get_xdata())), list(map(float, line.get_ydata())))
                handles.append(line)
                labels.append(key)
        if handles:
            ax.legend(handles, labels, fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[2:]:
        ax.set_xlabel("step")
    fig.suptitle(str(csv_path.parent))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out, drawn
