"""The ``imagenet-trainer`` command.

    imagenet-trainer VERB [experiment=NAME] [key=value ...]

Config errors exit with code 2 and a message naming the key, before anything heavy starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from trainer.config import ConfigError, experiments, load_config, to_yaml

OVERRIDES_HELP = (
    "config overrides: experiment=NAME picks a recipe from conf/experiment/, every other item is an "
    "OmegaConf dotlist key=value (e.g. data.root=/data/imagenet model.arch=resnet101 data.batch_size=128)"
)

FIT_EPILOG = """\
Writes RUN_DIR/config.yaml (the resolved config), RUN_DIR/checkpoints/last.ckpt (every epoch),
RUN_DIR/checkpoints/best-epochNNN.ckpt (best val top-1), RUN_DIR/metrics.csv and, at the end,
RUN_DIR/summary.json. RUN_DIR is run.dir (default runs/<model.arch>).

Resuming: running fit again with the same run.dir continues from checkpoints/last.ckpt (same
global step, optimiser and schedule state). Pass run.resume=false to refuse that instead, or a
new run.dir to start afresh.

Examples:
  imagenet-trainer fit experiment=smoke data.root=data/sample
  imagenet-trainer fit experiment=rn50_90ep data.root=/datasets/imagenet trainer.devices=8
"""


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagenet-trainer",
        description="Distributed ImageNet training of ResNets (and their plain twins) with Lightning.",
        epilog=f"experiments: {', '.join(experiments())}",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("fit", help="train", description="Train a model.", epilog=FIT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _overrides(p)

    p = sub.add_parser("validate", help="validate a checkpoint",
                       description="Top-1/top-5 of a checkpoint on the val split (data.root from the checkpoint "
                                   "unless overridden); prints them and writes them as JSON.")
    p.add_argument("ckpt")
    p.add_argument("--json", dest="json_out", default=None,
                   help="where to write the JSON result (default: RUN_DIR/validate.json beside checkpoints/)")
    _overrides(p)

    p = sub.add_parser("print-config", help="print the resolved config as YAML")
    _overrides(p)

    p = sub.add_parser("sample-data", help="write a small ImageNet-layout JPEG tree",
                       description="Write DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG: coloured shapes on "
                                   "noise, learnable but not trivially.")
    p.add_argument("dir")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--size", default="80x64", help="WIDTHxHEIGHT of the images (default 80x64)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("check-data", help="decode every image of a tree and report bad files",
                       description="Decodes every file under ROOT/train and ROOT/val in parallel; prints each bad "
                                   "file with its reason. Exit 1 if any is bad, 0 when clean.")
    p.add_argument("root")
    p.add_argument("--workers", type=int, default=None, help="parallel decoders (default: CPU count)")
    return parser


def _default_json_path(ckpt: str) -> Path:
    path = Path(ckpt).resolve()
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir / "validate.json"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"imagenet-trainer: config error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from data_pipelines.layout import DataLayoutError

    verb = args.verb
    if verb == "print-config":
        print(to_yaml(load_config(args.overrides)), end="")
        return 0
    if verb == "sample-data":
        from data_pipelines.sample import make_sample_tree

        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            print(f"imagenet-trainer: --size={args.size!r} must be WIDTHxHEIGHT, e.g. 80x64", file=sys.stderr)
            return 2
        root = make_sample_tree(args.dir, args.classes, args.train_per_class, args.val_per_class, (w, h), args.seed)
        print(f"wrote {args.classes} classes ({args.train_per_class} train, {args.val_per_class} val each) to {root}")
        return 0
    if verb == "check-data":
        from data_pipelines.check import main as check_main

        return check_main(args.root, args.workers)
    try:
        if verb == "fit":
            cfg = load_config(args.overrides)
            from trainer.run import fit

            summary = fit(cfg)
            print(
                f"done: val top-1 {summary.get('val/top1', float('nan')):.4f}, "
                f"top-5 {summary.get('val/top5', float('nan')):.4f} on {int(summary.get('val/images', 0))} images "
                f"after {summary['epochs']} epochs ({summary['global_step']} steps)\n"
                f"best checkpoint: {summary['best_ckpt']}\n"
                f"summary: {Path(cfg.run.dir) / 'summary.json'}"
            )
            return 0
        if verb == "validate":
            from trainer.run import validate_checkpoint

            result = validate_checkpoint(args.ckpt, args.overrides)
            out = Path(args.json_out) if args.json_out else _default_json_path(args.ckpt)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  images {result['images']}  ({out})")
            return 0
    except (DataLayoutError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        print(f"imagenet-trainer: {err}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled verb {verb}")


if __name__ == "__main__":
    sys.exit(main())
