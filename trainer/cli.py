"""The ``imagenet-trainer`` command.

    imagenet-trainer VERB [experiment=NAME] [key=value ...]

Config errors exit with code 2 and a message naming the key, before anything heavy starts.
``fit`` stopped by SIGUSR1 or SIGTERM checkpoints first (trainer/cluster/preemption.py), then exits
0 when the job was requeued (it resumes), 143 on SIGTERM, 3 when the requeue failed.
A failed ``fit`` appends a line to RUN_DIR/failures.jsonl and exits with the code of its cause
(trainer/cluster/exits.py: 1 crash, 10 hung, 12 a lost peer; trainer/cluster/failfast.py).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

from trainer.config import ConfigError, experiments, load_config, to_yaml

OVERRIDES_HELP = (
    "config overrides: experiment=NAME picks a recipe from conf/experiment/, every other item is an "
    "OmegaConf dotlist key=value (e.g. data.root=/data/imagenet model.arch=resnet101 data.batch_size=128)"
)

FIT_EPILOG = """\
Writes RUN_DIR/config.yaml (the resolved config), RUN_DIR/checkpoints/last.ckpt (every epoch),
RUN_DIR/checkpoints/best-epochNNN.ckpt (best val top-1), RUN_DIR/metrics.csv and, at the end,
RUN_DIR/summary.json. RUN_DIR is run.dir (default runs/<model.arch>).

W&B (logger.wandb.*): one run per job, id kept in RUN_DIR/wandb_run_id so that a resumed job
continues it; offline (RUN_DIR/wandb/offline-run-*, upload with `wandb sync`) when no API key is
set; logger.wandb.mode=disabled turns it off. `imagenet-trainer plot RUN_DIR` draws metrics.csv.

Resuming: running fit again with the same run.dir continues from checkpoints/last.ckpt (same
global step, optimiser and schedule state), or from RUN_DIR/hpc_ckpt_N.ckpt when newer: SIGUSR1
(sbatch --signal=USR1@N) writes it within two steps and, under srun, requeues the job; SIGTERM
writes it and stops. Pass run.resume=false to refuse that instead, or a
new run.dir to start afresh.

Examples:
  imagenet-trainer fit experiment=smoke data.root=data/sample
  imagenet-trainer fit experiment=rn50_90ep data.root=/datasets/imagenet trainer.devices=8
"""


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="a checkpoint's EMA of the weights (runs with ema.decay) or its raw trained weights "
                        "(default: ema when the checkpoint holds one, else raw)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"imagenet-trainer: config error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    """The command line: one subparser per entry of VERBS, in its order (the order of --help)."""
    parser = argparse.ArgumentParser(
        prog="imagenet-trainer",
        description="Distributed ImageNet training of ResNets (and their plain twins) with Lightning.",
        epilog=f"experiments: {', '.join(experiments())}",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add, _ in VERBS.values():
        add(sub)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    """The exit code of running ``args.verb`` with ``args``; a ConfigError goes up to main."""
    # Imported ahead of every verb, not only under fit and validate that catch its DataLayoutError,
    # as the CLI always has: it imports torch too, so moving it would change what every other verb loads.
    importlib.import_module("data_pipelines.layout")
    _, run = VERBS[args.verb]
    return run(args)


def _model_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with a missing file, a bad value or a failed load reported as ``imagenet-trainer VERB:
    ...`` and exit code 2 (the verbs on models and runs: export, predict, plot)."""
    @functools.wraps(run)
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            print(f"imagenet-trainer {args.verb}: {err}", file=sys.stderr)
            return 2
    return guarded


def _data_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` with a bad data tree or value reported as ``imagenet-trainer: ...`` and exit code 2
    (fit, validate); a ConfigError still goes up to main."""
    @functools.wraps(run)
    def guarded(args: argparse.Namespace) -> int:
        from data_pipelines.layout import DataLayoutError

        try:
            return run(args)
        except (DataLayoutError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            print(f"imagenet-trainer: {err}", file=sys.stderr)
            return 2
    return guarded


def _add_fit(sub) -> None:
    p = sub.add_parser("fit", help="train", description="Train a model.", epilog=FIT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _overrides(p)


@_data_errors
def _run_fit(args: argparse.Namespace) -> int:
    """Train; 0 when done (a summary printed on rank 0), or the preemption's exit code."""
    cfg = load_config(args.overrides)
    from trainer.cluster.guard import Diverged
    from trainer.cluster.preemption import Preempted
    from trainer.run import fit

    try:
        summary = fit(cfg)
    except Preempted as stop:
        from pytorch_lightning.utilities import rank_zero_only

        if rank_zero_only.rank == 0:
            print(f"imagenet-trainer: {stop}", file=sys.stderr)
        return stop.exit_code
    except Diverged as stop:  # trainer/cluster/guard.py: exit code 13 on every rank
        print(f"imagenet-trainer: {stop}", file=sys.stderr)
        return stop.exit_code
    except Exception as err:
        from trainer.cluster import exits, failfast

        if failfast._is_user_error(err):  # exit 2 (main, _data_errors), as before
            raise
        # A line in RUN_DIR/failures.jsonl first; a lost peer exits 12, anything else is a crash:
        # its traceback follows and the exit code is 1 (trainer/cluster/exits.py).
        failed = failfast.on_fit_error(cfg.run.dir, err)
        if failed is exits.CRASH:
            raise
        return failed.code
    if summary is None:  # not rank 0
        return 0
    print(
        f"done: val top-1 {summary.get('val/top1', float('nan')):.4f}, "
        f"top-5 {summary.get('val/top5', float('nan')):.4f} on {int(summary.get('val/images', 0))} images "
        f"after {summary['epochs']} epochs ({summary['global_step']} steps)\n"
        + (f"EMA weights: val top-1 {summary['val_ema/top1']:.4f}, top-5 {summary['val_ema/top5']:.4f}\n"
           if "val_ema/top1" in summary else "")
        + f"best checkpoint: {summary['best_ckpt']}\n"
        f"summary: {Path(cfg.run.dir) / 'summary.json'}"
    )
    return 0


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="validate a checkpoint",
                       description="Top-1/top-5 of a checkpoint on the val split (data.root from the checkpoint "
                                   "unless overridden); prints them and writes them as JSON.")
    p.add_argument("ckpt")
    p.add_argument("--json", dest="json_out", default=None,
                   help="where to write the JSON result (default: RUN_DIR/validate.json beside checkpoints/)")
    _weights(p)
    _overrides(p)


@_data_errors
def _run_validate(args: argparse.Namespace) -> int:
    """Validate a checkpoint; global rank 0 prints the result and writes it as JSON."""
    from trainer.run import validate_checkpoint

    result = validate_checkpoint(args.ckpt, args.overrides, weights=args.weights)
    if result is None:  # not global rank 0: rank 0 prints and writes the result
        return 0
    out = Path(args.json_out) if args.json_out else _default_json_path(args.ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  images {result['images']}  "
          f"{result['weights']} weights  ({out})")
    return 0


def _default_json_path(ckpt: str) -> Path:
    path = Path(ckpt).resolve()
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / "validate.json"


def _add_print_config(sub) -> None:
    p = sub.add_parser("print-config", help="print the resolved config as YAML")
    _overrides(p)


def _run_print_config(args: argparse.Namespace) -> int:
    """Print the resolved config as YAML."""
    print(to_yaml(load_config(args.overrides)), end="")
    return 0


def _add_sample_data(sub) -> None:
    p = sub.add_parser("sample-data", help="write a small ImageNet-layout JPEG tree",
                       description="Write DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG: coloured shapes on "
                                   "noise, learnable but not trivially.")
    p.add_argument("dir")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--size", default="80x64", help="WIDTHxHEIGHT of the images (default 80x64)")
    p.add_argument("--seed", type=int, default=0)


def _run_sample_data(args: argparse.Namespace) -> int:
    """Write the sample tree; 2 when --size is not WIDTHxHEIGHT."""
    from data_pipelines.sample import make_sample_tree

    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"imagenet-trainer: --size={args.size!r} must be WIDTHxHEIGHT, e.g. 80x64", file=sys.stderr)
        return 2
    root = make_sample_tree(args.dir, args.classes, args.train_per_class, args.val_per_class, (w, h), args.seed)
    print(f"wrote {args.classes} classes ({args.train_per_class} train, {args.val_per_class} val each) to {root}")
    return 0


def _add_submit(sub) -> None:
    p = sub.add_parser("submit", help="render slurm/train.sbatch for this config and sbatch it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Render slurm/train.sbatch with these SLURM options and config overrides, "
                                   "submit it with sbatch and print the job id. The job runs "
                                   "`srun python -m trainer fit OVERRIDES` with one task per GPU; node count and "
                                   "devices per node come from the allocation.",
                       epilog="Example:\n  imagenet-trainer submit --nodes 2 --gpus-per-node 8 --time 48:00:00 \\\n"
                              "      experiment=rn50_90ep data.root=/datasets/imagenet")
    from trainer.cluster.slurm import add_job_arguments

    add_job_arguments(p)
    p.add_argument("--job-name", default=None, help="default: experiment name, else imagenet-trainer")
    p.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit with its exit code")
    p.add_argument("--script-dir", default="runs/sbatch", help="where rendered scripts are kept (default runs/sbatch)")
    _overrides(p)


def _run_submit(args: argparse.Namespace) -> int:
    """Render the job script and sbatch it (or print it); submit's exit code."""
    from trainer.cluster.slurm import job_spec, submit

    # A bad override fails here, not after hours in the queue; ${oc.env:...} values are the job's.
    cfg = load_config(args.overrides, job_env=True)
    spec = job_spec(args, args.job_name or cfg.experiment or "imagenet-trainer")
    return submit(spec, args.overrides, dry_run=args.dry_run, wait=args.wait, script_dir=Path(args.script_dir))


def _add_check_data(sub) -> None:
    p = sub.add_parser("check-data", help="decode every image of a tree and report bad files (a pack: check its shards)",
                       description="Decodes every file under ROOT/train and ROOT/val in parallel; prints each bad "
                                   "file with its reason. ROOT a pack (imagenet-trainer pack): checks every shard's "
                                   "size and sha256 against its manifest instead. Exit 1 if any is bad, 0 when clean.")
    p.add_argument("root")
    p.add_argument("--workers", type=int, default=None, help="parallel decoders (default: CPU count)")


def _run_check_data(args: argparse.Namespace) -> int:
    """Decode every image of the tree; 1 if any is bad, 0 when clean."""
    from data_pipelines.check import main as check_main

    return check_main(args.root, args.workers)


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="convert an ImageNet folder tree into tar shards (WebDataset, DALI indices)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Decode-check every image under ROOT/train and ROOT/val (as check-data does), "
                                   "then write\nOUT/train-NNNNNN.tar, OUT/val-NNNNNN.tar with their DALI indices "
                                   "(.idx) and OUT/manifest.json\n(data_pipelines/pack_format.py defines the format). "
                                   "Train images go in a seeded random order, val\nimages in listing order.",
                       epilog="Exit 1 when some image does not decode (each listed; nothing written), 2 on a bad "
                              "argument or layout.\nKilled? Run it again with the same arguments: finished shards "
                              "are verified and kept.\n\nExample:\n  imagenet-trainer pack /datasets/imagenet "
                              "/datasets/imagenet-shards --shard-size 1GB")
    p.add_argument("root", metavar="ROOT")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--shard-size", default="512MB",
                   help="most bytes of tar per shard (a shard holds at least one image): 512MB, 1GB, 64KB, "
                        "1MiB or bytes (default 512MB)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that decode and write (default: CPU cores available)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out the images that do not decode (listed in the manifest) instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="seed of the train images' order (default 0)")


def _run_pack(args: argparse.Namespace) -> int:
    """Pack the tree; 0 when done, 1 when some image is bad, 2 on a bad argument or layout."""
    from data_pipelines.pack import main as pack_main

    return pack_main(args.root, args.out, shard_size=args.shard_size, workers=args.workers,
                     skip_bad=args.skip_bad, seed=args.seed)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a torchvision state_dict, safetensors, ONNX or a "
                                      "Hugging Face folder that timm loads",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Export a Lightning checkpoint for use without this project, with a JSON sidecar "
                                   "OUT.json (arch, class names in index order and their words, preprocessing).",
                       epilog="torchvision: torchvision.models.resnet50(num_classes=K).load_state_dict(torch.load(OUT, "
                              "weights_only=True))\n"
                              "  (resnet18/34/50/101/152; other archs: trainer.recipe.models.build_model)\n"
                              "onnx: input 'images' [batch, 3, crop, crop], output 'logits'; batch axis dynamic\n"
                              "hf: OUT is a folder (config.json, model.safetensors, README.md model card):\n"
                              "  timm.create_model('local-dir:OUT', pretrained=True); upload it for "
                              "'hf-hub:USER/NAME'\n"
                              "  imagenet-trainer export runs/rn50/checkpoints/last.ckpt --format hf \\\n"
                              "      --out rn50-in1k --results runs/rn50/evaluate.json --license apache-2.0\n"
                              "Any of them loads back with trainer.load_pretrained(OUT) (hf: OUT/model.safetensors).")
    p.add_argument("ckpt")
    p.add_argument("--format", dest="fmt", default="torchvision", choices=["torchvision", "safetensors", "onnx", "hf"])
    p.add_argument("--out", default=None, help="output file, or folder for hf (default: beside CKPT, "
                                               ".pt/.safetensors/.onnx, or CKPT's name + '-hf' for hf)")
    p.add_argument("--results", action="append", default=[], metavar="JSON",
                   help="hf: a JSON of `evaluate --json` or `validate` on this checkpoint, for the model card's "
                        "results (repeatable); the run's summary.json and validate.json are read by themselves")
    p.add_argument("--license", default=None, help="hf: the weights' license for the card (an SPDX id, "
                                                    "e.g. apache-2.0); left out when not given")
    _weights(p)


@_model_errors
def _run_export(args: argparse.Namespace) -> int:
    """Write the exported model and its JSON sidecar (hf: the folder, its model card says what was measured)."""
    from trainer.artifacts.export import export_checkpoint, export_hf

    if args.fmt != "hf" and (args.results or args.license):
        raise ValueError("--results and --license are for --format hf (the model card)")
    if args.fmt == "hf":
        meta = export_hf(args.ckpt, args.out, weights=args.weights, results=args.results, license=args.license)
        for note in meta["notes"]:
            print(f"imagenet-trainer export: note: {note}", file=sys.stderr)
        measured = ", ".join(f"{r['set']} from {r['source'].split(' ')[0]}" for r in meta["results"]) or "none recorded"
        print(f"wrote {meta['path']} (hf: config.json, model.safetensors, README.md; timm {meta['timm_architecture']}, "
              f"{meta['num_classes']} classes, {meta['weights']} weights; results in the card: {measured}) "
              f"and {meta['sidecar']}")
        return 0
    meta = export_checkpoint(args.ckpt, args.out, args.fmt, weights=args.weights)
    print(f"wrote {meta['path']} ({args.fmt}, {meta['arch']}, {meta['num_classes']} classes, {meta['weights']} weights) "
          f"and {meta['sidecar']}")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of image files or folders",
                       description="Top-k class names and probabilities for image files, or every image under "
                                   "folders. MODEL: a .ckpt, an exported file, or wandb:ENTITY/PROJECT/NAME:ALIAS.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--topk", type=int, default=5)
    _weights(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", dest="as_json", action="store_true", help="print a JSON list instead of text lines")


@_model_errors
def _run_predict(args: argparse.Namespace) -> int:
    """Print each file's top-k classes; 1 when some file could not be read, else 0."""
    from trainer.artifacts.predict import find_images, format_results, predict_files
    from trainer.artifacts.pretrained import load_pretrained

    if args.topk < 1 or args.batch_size < 1:
        raise ValueError(f"--topk={args.topk} and --batch-size={args.batch_size} must be at least 1")
    files = find_images(args.paths)
    model = load_pretrained(args.model, weights=args.weights)
    results = predict_files(model, files, topk=args.topk, batch_size=args.batch_size)
    print(json.dumps(results, indent=2) if args.as_json else format_results(results))
    failed = [r["path"] for r in results if "error" in r]
    if failed:
        print(f"imagenet-trainer predict: {len(failed)} of {len(results)} files could not be read "
              f"(run `imagenet-trainer check-data` on their tree)", file=sys.stderr)
    return 1 if failed else 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's curves (loss, top-1/top-5, lr, images/s) into a PNG",
                       description="Reads RUN_DIR/metrics.csv (written by every fit, with or without W&B) and "
                                   "draws loss, top-1/top-5, learning rate and images/s against the step.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="PNG file (default RUN_DIR/metrics.png)")


@_model_errors
def _run_plot(args: argparse.Namespace) -> int:
    """Draw the run's metrics.csv into a PNG."""
    from trainer.artifacts.plot import plot_run

    out, drawn = plot_run(args.run_dir, args.out)
    print(f"wrote {out} ({', '.join(sorted(drawn))})")
    return 0


def _add_study(sub) -> None:
    from trainer.artifacts.study import STUDY_EPILOG, add_arguments as add_study_arguments

    p = sub.add_parser("study", help="train plain and residual nets alike and plot their errors (He et al. 2015)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=STUDY_EPILOG,
                       description="The degradation study: plain and residual nets of two depths trained with one "
                                   "recipe, seed and data; their training and validation error curves in one figure.")
    add_study_arguments(p)


def _run_study(args: argparse.Namespace) -> int:
    """The study's own exit code (trainer/artifacts/study.py)."""
    from trainer.artifacts.study import main as study_main

    return study_main(args)


def _delegated(module: str, verb: str, help: str) -> tuple[Callable, Callable[[argparse.Namespace], int]]:
    """A verb whose arguments and run live in ``module``: ``add_arguments(parser)`` (which also sets
    the parser's description and epilog) and ``main(args) -> exit code``, as the newer verbs keep
    their command line beside the code it drives instead of here."""
    def add(sub) -> None:
        p = sub.add_parser(verb, help=help, formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(module).add_arguments(p)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).main(args)

    return add, run


# Each verb: (add its subparser, run it and return the exit code). The order is --help's.
VERBS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "fit": (_add_fit, _run_fit),
    "validate": (_add_validate, _run_validate),
    "print-config": (_add_print_config, _run_print_config),
    "sample-data": (_add_sample_data, _run_sample_data),
    "submit": (_add_submit, _run_submit),
    "check-data": (_add_check_data, _run_check_data),
    "pack": (_add_pack, _run_pack),
    "prepare": _delegated("data_pipelines.prepare", "prepare",
                          "the ILSVRC-2012 archives, Kaggle's or Hugging Face's download into a pack or folder tree"),
    "export": (_add_export, _run_export),
    "predict": (_add_predict, _run_predict),
    "evaluate": _delegated("trainer.artifacts.evaluate", "evaluate",
                           "top-1/top-5 and calibration on val, ReaL, V2, Sketch, A, R and C"),
    "features": _delegated("trainer.artifacts.features", "features",
                           "pooled features of a model's frozen backbone on image sets (DINO's layout)"),
    "knn": _delegated("trainer.artifacts.knn", "knn", "k-nearest-neighbour classification of dumped features"),
    "plot": (_add_plot, _run_plot),
    "study": (_add_study, _run_study),
}


if __name__ == "__main__":
    sys.exit(main())
