"""The degradation study of He et al. 2015 (Figures 4 and 6): ``imagenet-trainer study degradation``.

Plain and residual nets of two depths are trained with one recipe, one seed and one data tree,
each in ``RUN_DIR/<arch>/`` (RUN_DIR is the recipe's run.dir), then their error curves are drawn
into ``RUN_DIR/study.png`` (plain dashed, residual solid, one colour per depth) and tabulated in
``RUN_DIR/study.md`` (and ``study.json``). Training error is 1 - ``train/top1_epoch``: the mean over
the epoch's augmented training batches, BatchNorm in training mode, as the paper plots it;
validation error is 1 - ``val/top1`` at the end of each epoch. Both come from each run's own
``metrics.csv``, so the figure can be drawn again, or after SLURM jobs, with ``--plot-only RUN_DIR``.

Each architecture is trained by a child ``imagenet-trainer fit`` process rather than in this one:
multi-device DDP re-runs the launching command line, which must be ``fit`` itself; each net starts
from a clean process (memory, seeds); and the children's CPU time is measured exactly
(``RUSAGE_CHILDREN``), which is what a CPU-box study is budgeted in.

Nothing here is imported by training; only the CLI calls it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trainer.cluster.slurm import add_job_arguments

# Study name -> {recipe: default architectures}. The first recipe is the default one.
STUDIES: dict[str, dict[str, tuple[str, ...]]] = {
    "degradation": {
        "degradation_cifar": ("plain20", "plain56", "resnet20", "resnet56"),  # the paper's Figure 6
        "degradation_imagenet": ("plain18", "plain34", "resnet18", "resnet34"),  # Figure 4
    },
}
# One colour per depth (shallowest first); plain and residual nets of a depth share it.
DEPTH_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:orange", "tab:purple", "tab:brown")


@dataclass
class Curves:
    """Per-epoch errors of one run, epochs counted from 1 (the error after that many epochs)."""

    arch: str
    train_epochs: list[int] = field(default_factory=list)
    train_error: list[float] = field(default_factory=list)
    val_epochs: list[int] = field(default_factory=list)
    val_error: list[float] = field(default_factory=list)
    cpu_s: float | None = None  # CPU seconds this study spent training it (None: trained elsewhere)

    @property
    def residual(self) -> bool:
        from trainer.recipe.models import ARCHS

        return ARCHS[self.arch].residual if self.arch in ARCHS else not self.arch.startswith("plain")

    @property
    def depth(self) -> int:
        digits = re.findall(r"\d+", self.arch)
        return int(digits[-1]) if digits else 0


# --- reading runs ---------------------------------------------------------------------------


def read_curves(run_dir: str | Path, arch: str | None = None) -> Curves:
    """The error curves of one run from ``run_dir/metrics.csv``.

    Lightning's CSVLogger splits an epoch over several rows (step rows, the training epoch's
    row, the validation row; a resumed run may repeat some), so rows are grouped by their
    ``epoch`` and the last non-empty value of each metric is taken.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished or running fit")
    by_epoch: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            values = by_epoch.setdefault(int(float(epoch)), {})
            for key in ("train/top1_epoch", "val/top1"):
                cell = row.get(key)
                if cell not in (None, "") and math.isfinite(float(cell)):
                    values[key] = float(cell)
    curves = Curves(arch or _arch_of(run_dir))
    for epoch in sorted(by_epoch):
        values = by_epoch[epoch]
        if "train/top1_epoch" in values:
            curves.train_epochs.append(epoch + 1)
            curves.train_error.append(1.0 - values["train/top1_epoch"])
        if "val/top1" in values:
            curves.val_epochs.append(epoch + 1)
            curves.val_error.append(1.0 - values["val/top1"])
    cpu_file = run_dir / "study_cpu.json"
    if cpu_file.is_file():
        curves.cpu_s = json.loads(cpu_file.read_text())["cpu_s"]
    return curves


def _arch_of(run_dir: Path) -> str:
    """model.arch from the run's saved config, else the folder's name."""
    config = run_dir / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        arch = OmegaConf.select(OmegaConf.load(config), "model.arch")
        if arch:
            return str(arch)
    return run_dir.name


def _run_info(run_dir: Path) -> dict:
    """Recipe, seed and data of a run, from its saved config (empty when there is none)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config)
    keys = ("experiment", "seed", "data.root", "data.image_size", "data.batch_size", "optim.lr",
            "optim.warmup_epochs", "optim.schedule", "optim.milestones", "trainer.max_epochs")
    return {k: OmegaConf.select(cfg, k) for k in keys}


def _schedule_words(info: dict) -> str:
    """The lr schedule of a run's info, as the study's table states it."""
    schedule = info.get("optim.schedule") or "cosine"  # runs from before the key: cosine
    if schedule == "step":
        return f"lr / 10 at epochs {', '.join(str(int(m)) for m in info.get('optim.milestones') or [])}"
    return schedule


def finished_archs(study_dir: str | Path) -> list[str]:
    """The architectures with a ``metrics.csv`` under ``study_dir``, ordered for the legend."""
    study_dir = Path(study_dir)
    found = [_arch_of(p.parent) for p in study_dir.glob("*/metrics.csv")]
    return order_archs(found)


def order_archs(archs: list[str] | tuple[str, ...]) -> list[str]:
    """Plain before residual, shallow before deep: the legend's order."""
    return sorted(archs, key=lambda a: (Curves(a).residual, Curves(a).depth, a))


# --- the report: figure and tables ----------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _compare(a: Curves, b: Curves) -> dict | None:
    """``b`` against ``a``: training error difference (b - a) at the last epoch both reached, and
    in how many of their common epochs ``b``'s training error was the higher one."""
    ea, eb = dict(zip(a.train_epochs, a.train_error)), dict(zip(b.train_epochs, b.train_error))
    common = sorted(set(ea) & set(eb))
    if not common:
        return None
    va, vb = dict(zip(a.val_epochs, a.val_error)), dict(zip(b.val_epochs, b.val_error))
    last = common[-1]
    return {
        "a": a.arch,
        "b": b.arch,
        "epoch": last,
        "train_gap": eb[last] - ea[last],
        "val_gap": (vb[last] - va[last]) if last in va and last in vb else None,
        "epochs_b_higher": sum(eb[e] > ea[e] for e in common),
        "epochs": len(common),
    }


def _gap(curves: list[Curves], residual: bool) -> dict | None:
    """The deepest against the shallowest net of one kind (plain or residual)."""
    kind = sorted((c for c in curves if c.residual == residual and c.train_error), key=lambda c: c.depth)
    if len(kind) < 2 or kind[0].depth == kind[-1].depth:
        return None
    return _compare(kind[0], kind[-1])


def _shortcut_gains(curves: list[Curves]) -> list[dict]:
    """The residual net against the plain net of the same depth, for every depth with both."""
    out = []
    for plain in (c for c in curves if not c.residual and c.train_error):
        for res in (c for c in curves if c.residual and c.depth == plain.depth and c.train_error):
            cmp = _compare(plain, res)
            if cmp:
                out.append(cmp)
    return out


def _verdict(plain_deeper_higher: bool, residual_deeper_higher: bool) -> str:
    """One sentence: is He et al.'s pattern (deeper plain worse, deeper residual better) there?"""
    if plain_deeper_higher and not residual_deeper_higher:
        return ("**The paper's pattern is reproduced**: the deeper plain net ends at a higher training error than "
                "the shallower one, and with shortcuts the deeper net ends lower.")
    if plain_deeper_higher:
        return ("**Only half of the paper's pattern**: the deeper plain net ends at a higher training error, but so "
                "does the deeper residual net, so this budget does not separate degradation from deep nets simply "
                "training slower; train longer (the paper: 64k iterations) or on more data.")
    return ("**No degradation at this budget**: the deeper plain net does not end at a higher training error than "
            "the shallower one.")


def report_markdown(study_dir: Path, curves: list[Curves], title: str) -> str:
    """``study.md``: final errors, the depth gaps, and every number the figure draws."""
    infos = {c.arch: _run_info(study_dir / c.arch) for c in curves}
    info = next((i for i in infos.values() if i), {})
    lines = [f"# {title}", ""]
    differ = sorted({k for i in infos.values() if i for k in i if i[k] != info.get(k)})
    if differ:
        lines += [f"**The runs were not trained alike**: they differ in {', '.join(differ)} "
                  f"(see each {study_dir}/<arch>/config.yaml).", ""]
    if info:
        lines += [
            f"Recipe `{info.get('experiment')}`, seed {info.get('seed')}, data `{info.get('data.root')}`, "
            f"{info.get('data.image_size')}px crops, batch {info.get('data.batch_size')} per device, "
            f"optim.lr {info.get('optim.lr')} (per 256 images), warmup {info.get('optim.warmup_epochs')} epochs "
            f"then {_schedule_words(info)}, {info.get('trainer.max_epochs')} epochs.",
            "",
        ]
    lines += [
        "Error = 1 - top-1. Training error: mean over each epoch's augmented training batches (BatchNorm in "
        "training mode), as He et al. plot it. Validation error: the val split, centre crop, after each epoch.",
        "",
        "| arch | shortcuts | depth | epochs | final train error | final val error | best val error | CPU-min |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curves:
        lines.append(
            f"| {c.arch} | {'residual' if c.residual else 'plain'} | {c.depth} | {len(c.train_epochs)} | "
            f"{_fmt(c.train_error[-1] if c.train_error else None)} | {_fmt(c.val_error[-1] if c.val_error else None)} | "
            f"{_fmt(min(c.val_error) if c.val_error else None)} | "
            f"{'–' if c.cpu_s is None else f'{c.cpu_s / 60:.1f}'} |"
        )
    lines.append("")
    plain_gap, residual_gap = _gap(curves, residual=False), _gap(curves, residual=True)
    if plain_gap and residual_gap:
        lines += [_verdict(plain_gap["train_gap"] > 0, residual_gap["train_gap"] > 0), ""]
    for residual, name, gap in ((False, "Plain", plain_gap), (True, "Residual", residual_gap)):
        if gap is None:
            continue
        higher = gap["train_gap"] > 0
        verdict = ("higher, as degradation predicts" if higher else "not higher: no degradation") if not residual \
            else ("higher: depth has not paid off" if higher else "lower or equal: depth helps")
        lines.append(
            f"- {name}, deeper vs shallower: {gap['b']}'s training error minus {gap['a']}'s after epoch "
            f"{gap['epoch']} = {gap['train_gap']:+.4f} ({verdict}); {gap['b']}'s was the higher one in "
            f"{gap['epochs_b_higher']} of {gap['epochs']} epochs."
        )
    for gain in _shortcut_gains(curves):
        lines.append(
            f"- Shortcuts at depth {Curves(gain['a']).depth}: {gain['b']}'s training error minus {gain['a']}'s after "
            f"epoch {gain['epoch']} = {gain['train_gap']:+.4f}; {gain['b']}'s was the higher one in "
            f"{gain['epochs_b_higher']} of {gain['epochs']} epochs."
        )
    lines += ["", "## Per epoch (the numbers study.png draws)", ""]
    header = ["epoch"] + [f"{c.arch} {split}" for c in curves for split in ("train", "val")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    epochs = sorted({e for c in curves for e in c.train_epochs + c.val_epochs})
    for e in epochs:
        cells = [str(e)]
        for c in curves:
            cells.append(_fmt(dict(zip(c.train_epochs, c.train_error)).get(e)))
            cells.append(_fmt(dict(zip(c.val_epochs, c.val_error)).get(e)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(curves: list[Curves], out: Path, title: str) -> dict[str, dict[str, list[float]]]:
    """Draw training and validation error against the epoch into ``out``.

    Plain nets dashed, residual nets solid, one colour per depth. Returns, per arch, the series
    read back from the drawn lines (``train``/``val`` errors, in the order of the epochs).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    depths = sorted({c.depth for c in curves})
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    drawn: dict[str, dict[str, list[float]]] = {}
    for ax, split, label in ((axes[0], "train", "training error (augmented batches)"),
                             (axes[1], "val", "validation error")):
        for c in curves:
            x, y = (c.train_epochs, c.train_error) if split == "train" else (c.val_epochs, c.val_error)
            if not x:
                continue
            colour = DEPTH_COLOURS[depths.index(c.depth) % len(DEPTH_COLOURS)]
            (line,) = ax.plot(x, [100 * v for v in y], "--" if not c.residual else "-", color=colour,
                              linewidth=1.4 if not c.residual else 2.0, marker="." if len(x) < 40 else None,
                              label=c.arch)
            drawn.setdefault(c.arch, {})[split] = [float(v) / 100 for v in line.get_ydata()]
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    axes[0].set_ylabel("error (%)")
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return drawn


def write_report(study_dir: str | Path, archs: list[str] | None = None, name: str = "degradation") -> dict:
    """Read every run under ``study_dir`` (or the named ``archs``) and write ``study.md``,
    ``study.json`` and ``study.png`` there. Returns paths and the numbers written."""
    study_dir = Path(study_dir)
    archs = order_archs(archs) if archs else finished_archs(study_dir)
    if not archs:
        raise FileNotFoundError(
            f"no run with a metrics.csv under {study_dir}/<arch>/: train them first "
            f"(`imagenet-trainer study {name}` without --plot-only), or name the study's run.dir"
        )
    curves = [read_curves(study_dir / a, a) for a in archs]
    empty = [c.arch for c in curves if not c.train_error]
    if len(empty) == len(curves):
        raise ValueError(f"no run under {study_dir} has finished an epoch yet ({', '.join(empty)}): plot again later")
    title = f"{name} study: plain (dashed) vs residual (solid), {study_dir}"
    md = study_dir / "study.md"
    md.write_text(report_markdown(study_dir, curves, title))
    summary = {
        "archs": archs,
        "curves": {c.arch: {"train_epochs": c.train_epochs, "train_error": c.train_error,
                            "val_epochs": c.val_epochs, "val_error": c.val_error, "cpu_s": c.cpu_s}
                   for c in curves},
        "plain_gap": _gap(curves, residual=False),
        "residual_gap": _gap(curves, residual=True),
        "shortcut_gains": _shortcut_gains(curves),
        "markdown": str(md),
    }
    (study_dir / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        summary["drawn"] = plot_study(curves, study_dir / "study.png", title)
        summary["png"] = str(study_dir / "study.png")
    except ImportError:
        summary["png"] = None
        print(f"imagenet-trainer study: matplotlib is not installed, so {study_dir / 'study.png'} was not drawn "
              f"(pip install 'imagenet-trainer[plot]'); the numbers are in {md}", file=sys.stderr)
    return summary


# --- training the runs ----------------------------------------------------------------------


def study_overrides(name: str, overrides: list[str]) -> list[str]:
    """The overrides with the study's default recipe first unless one is named."""
    if any(o.split("=", 1)[0] == "experiment" for o in overrides):
        return list(overrides)
    return [f"experiment={next(iter(STUDIES[name]))}", *overrides]


def default_archs(name: str, experiment: str | None) -> tuple[str, ...]:
    recipes = STUDIES[name]
    if experiment in recipes:
        return recipes[experiment]
    from trainer.config import ConfigError

    raise ConfigError(
        f"experiment={experiment!r} is not a {name} recipe ({', '.join(recipes)}): name the nets to compare "
        f"with --archs, e.g. --archs plain20,plain56,resnet20,resnet56"
    )


def arch_overrides(overrides: list[str], arch: str, study_dir: Path | str) -> list[str]:
    """One net's fit: the study's overrides, then its arch and its own run directory."""
    return [*overrides, f"model.arch={arch}", f"run.dir={Path(study_dir) / arch}"]


def is_finished(run_dir: Path, max_epochs: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("epochs", 0) >= max_epochs


def train_arch(overrides: list[str]) -> tuple[int, float]:
    """``imagenet-trainer fit OVERRIDES`` in a child process; (exit code, CPU seconds it and its
    children, e.g. DataLoader workers, used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "trainer", "fit", *overrides])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, cpu


def _add_cpu(run_dir: Path, cpu_s: float, wall_s: float) -> None:
    """Accumulate the CPU time spent on a run (a resumed run adds to it)."""
    path = run_dir / "study_cpu.json"
    old = json.loads(path.read_text()) if path.is_file() else {"cpu_s": 0.0, "wall_s": 0.0}
    path.write_text(json.dumps({"cpu_s": old["cpu_s"] + cpu_s, "wall_s": old["wall_s"] + wall_s}) + "\n")


def run_local(name: str, overrides: list[str], archs: tuple[str, ...], study_dir: Path) -> int:
    """Train each net in turn (finished runs are kept, interrupted ones resume), then report."""
    from trainer.config import load_config

    configs = {a: load_config(arch_overrides(overrides, a, study_dir)) for a in archs}  # all fail now, not at net 3
    for i, arch in enumerate(archs, 1):
        run_dir = study_dir / arch
        if is_finished(run_dir, configs[arch].trainer.max_epochs):
            print(f"[study {i}/{len(archs)}] {arch}: finished in {run_dir}, not trained again", flush=True)
            continue
        print(f"[study {i}/{len(archs)}] {arch}: training in {run_dir}", flush=True)
        t0 = time.time()
        code, cpu = train_arch(arch_overrides(overrides, arch, study_dir))
        if run_dir.is_dir():
            _add_cpu(run_dir, cpu, time.time() - t0)
        print(f"[study {i}/{len(archs)}] {arch}: exit {code}, {cpu / 60:.1f} CPU-min", flush=True)
        if code != 0:
            print(f"imagenet-trainer study: training {arch} failed (exit {code}); fix it and run the same "
                  f"command again: finished nets are kept and {arch} resumes", file=sys.stderr)
            return code
    return _print_report(write_report(study_dir, list(archs), name))


def run_submit(name: str, overrides: list[str], archs: tuple[str, ...], study_dir: Path,
               args: argparse.Namespace) -> int:
    """One SLURM job per net (trainer/cluster/slurm.py), each training into ``study_dir/<arch>``."""
    from trainer.cluster.slurm import job_spec, submit
    from trainer.config import load_config

    for arch in archs:
        cfg = load_config(arch_overrides(overrides, arch, study_dir))  # a bad override fails before sbatch
    ranks = args.nodes * (args.tasks_per_node or max(1, args.gpus_per_node))
    if ranks > 1:  # the recipe's batch is per device: say what the jobs will train with
        print(f"note: {ranks} ranks x data.batch_size={cfg.data.batch_size} = global batch "
              f"{ranks * cfg.data.batch_size} (lr scaled to {cfg.optim.lr * ranks * cfg.data.batch_size / 256:g}); "
              f"the paper's CIFAR study used 128 on one GPU (--gpus-per-node 1), its ImageNet study 256",
              file=sys.stderr)

    def one(arch: str) -> int:
        spec = job_spec(args, f"{name}-{arch}")
        # Each job's script is kept in its own folder: submit() names it by this process's id.
        script_dir = Path(args.script_dir) / arch if args.script_dir else study_dir / arch
        return submit(spec, arch_overrides(overrides, arch, study_dir), dry_run=args.dry_run, wait=args.wait,
                      script_dir=script_dir)

    if args.wait and not args.dry_run:
        with ThreadPoolExecutor(len(archs)) as pool:  # the jobs run at once; wait for them all
            codes = list(pool.map(one, archs))
    else:
        codes = [one(a) for a in archs]
    failed = [a for a, c in zip(archs, codes) if c != 0]
    if failed:
        print(f"imagenet-trainer study: {', '.join(failed)} failed to submit or run", file=sys.stderr)
        return next(c for c in codes if c != 0)
    if args.dry_run:
        return 0
    if args.wait:
        return _print_report(write_report(study_dir, list(archs), name))
    print(f"when the jobs have finished (or at any time, for the epochs done so far), draw the figure with:\n"
          f"  imagenet-trainer study {name} --plot-only {study_dir}", flush=True)
    return 0


def _print_report(summary: dict) -> int:
    for gap in (summary.get("plain_gap"), summary.get("residual_gap"), *summary.get("shortcut_gains", [])):
        if gap:
            print(f"{gap['b']} - {gap['a']} training error after epoch {gap['epoch']}: {gap['train_gap']:+.4f} "
                  f"({gap['b']} higher in {gap['epochs_b_higher']}/{gap['epochs']} epochs)")
    print(f"wrote {summary['markdown']}" + (f" and {summary['png']}" if summary.get("png") else ""))
    return 0


# --- the CLI verb ---------------------------------------------------------------------------

STUDY_EPILOG = """\
Each net trains in RUN_DIR/<arch>/ (RUN_DIR: the recipe's run.dir, e.g. runs/degradation_cifar),
with the recipe, seed and data of every other; then RUN_DIR/study.png (error curves, plain dashed,
residual solid), RUN_DIR/study.md and RUN_DIR/study.json (the numbers) are written. Running the
same command again keeps finished nets and resumes interrupted ones.

Examples:
  imagenet-trainer sample-data data/shapes --classes 10 --train-per-class 400 --val-per-class 100 --size 40x40
  imagenet-trainer study degradation data.root=data/shapes trainer.max_epochs=10 data.backend=torchvision
  imagenet-trainer study degradation --archs plain20,plain56 data.root=data/shapes trainer.max_epochs=2
  imagenet-trainer study degradation experiment=degradation_imagenet data.root=/datasets/imagenet \\
      --submit --nodes 1 --gpus-per-node 8 --time 72:00:00
  imagenet-trainer study degradation --plot-only runs/degradation_imagenet
"""


def add_arguments(parent: argparse.ArgumentParser) -> None:
    # One sub-parser per study rather than a NAME positional: argparse (before Python 3.13) gives
    # a key=value list nothing when it follows a positional and an option (`degradation --archs A x=1`).
    studies = parent.add_subparsers(dest="name", required=True, metavar="STUDY")
    for name in STUDIES:
        p = studies.add_parser(name, help="He et al. 2015, Fig. 4/6: plain vs residual, shallow vs deep",
                               description=parent.description, epilog=STUDY_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_study_arguments(p)


def _add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archs", default=None,
                   help="comma-separated nets (default: the recipe's four, e.g. plain20,plain56,resnet20,resnet56)")
    p.add_argument("--plot-only", metavar="RUN_DIR", default=None,
                   help="train nothing: draw study.png and study.md from the runs under RUN_DIR/<arch>/")
    p.add_argument("--submit", action="store_true", help="one SLURM job per net instead of training here")
    slurm = p.add_argument_group("SLURM (with --submit; as `imagenet-trainer submit`)")
    add_job_arguments(slurm, many=True)
    slurm.add_argument("--dry-run", action="store_true", help="print the scripts instead of submitting them")
    slurm.add_argument("--wait", action="store_true", help="wait for every job, then draw the figure")
    slurm.add_argument("--script-dir", default=None,
                       help="where rendered scripts are kept, one folder per net (default: each net's run dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every net (the recipe defaults to experiment=degradation_cifar), "
                        "e.g. data.root=DIR trainer.max_epochs=10")


def main(args: argparse.Namespace) -> int:
    from trainer.config import ConfigError, load_config, require_data_root

    name = args.name
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip()) if args.archs else None
    if archs:
        from trainer.recipe.models import ARCHS

        unknown = [a for a in archs if a not in ARCHS]
        if unknown:
            raise ConfigError(f"--archs names unknown nets {', '.join(unknown)}; choose from: {', '.join(ARCHS)}")
    if args.plot_only:
        if args.overrides or args.submit:
            raise ConfigError("--plot-only RUN_DIR draws existing runs: it takes no overrides and no --submit")
        try:
            return _print_report(write_report(args.plot_only, list(archs) if archs else None, name))
        except (FileNotFoundError, ValueError) as err:
            print(f"imagenet-trainer study: {err}", file=sys.stderr)
            return 2
    overrides = study_overrides(name, list(args.overrides))
    cfg = load_config(overrides)  # the study's run.dir, and a bad override fails here
    if cfg.data.backend != "synthetic":
        require_data_root(cfg)  # not four failed fits later
    archs = archs or default_archs(name, cfg.experiment)
    if len(set(archs)) != len(archs):
        raise ConfigError(f"--archs names a net twice: {','.join(archs)}")
    study_dir = Path(cfg.run.dir)
    if args.submit:
        return run_submit(name, overrides, archs, study_dir, args)
    if args.dry_run or args.wait:
        raise ConfigError("--dry-run and --wait go with --submit")
    os.makedirs(study_dir, exist_ok=True)
    return run_local(name, overrides, archs, study_dir)
