"""``imagenet-trainer evaluate MODEL --set NAME=PATH ...``: a trained model on ImageNet's val split
and its robustness sets (ReaL, V2, Sketch, A, R, C), with calibration, as a table, timm's
``validate.py`` CSV, JSON and a W&B table.

The sets and their layouts are :mod:`evalsets`'; the model's rows per image :mod:`inference`'s
(any backend, and the ranks of a torchrun/srun launch each computing a share, every image counted
once); the metric formulas :mod:`eval_metrics`'. Here: which logits and labels each set is scored
on (:func:`score_sets`), and the outputs.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

VERB = "imagenet-trainer evaluate"
# timm validate.py's columns (its results CSVs), then ours: top1_diff against val, and the set.
CSV_COLUMNS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
               "interpolation", "top1_diff", "set")
ECE_BINS = 15


def add_arguments(p: argparse.ArgumentParser) -> None:
    from trainer.artifacts.export import WEIGHTS
    from trainer.artifacts.inference import BACKENDS

    p.description = (
        "Top-1/top-5 accuracy and calibration (ECE with 15 bins, NLL) of MODEL (a .ckpt, an export, or\n"
        "wandb:ENTITY/PROJECT/NAME:ALIAS) on ImageNet's val split and its robustness sets. Each --set\n"
        "NAME=PATH names one; NAME is its kind, or its kind-suffix (v2-threshold0.7):\n"
        "  val     PATH/<wnid>/*.JPEG, a dataset root with val/, or a pack (manifest.json)\n"
        "  real    ReaL's real.json; scored on the val images, matched by file name (needs val)\n"
        "  v2      ImageNet-V2: PATH/<class index 0..999>/ (folders read as numbers)\n"
        "  sketch  ImageNet-Sketch: PATH/<wnid>/\n"
        "  a, r    ImageNet-A, -R: PATH/<wnid>/, scored on the logits of their classes only; also the\n"
        "          same classes' top-1 on val ('clean')\n"
        "  c       ImageNet-C: PATH/<corruption>/<severity 1-5>/<wnid>/, centre crop without resize;\n"
        "          errors per corruption and severity, mCE and relative mCE against AlexNet's\n"
        "Labels go through wnids: a set with a wnid the model has no class for is refused. Under\n"
        "torchrun or srun each rank evaluates a share of every set, each image counted once.\n"
        "Backends: torchvision (Pillow, the default), dali_cpu, dali_gpu (a GPU's nvJPEG)."
    )
    p.epilog = (
        "example:\n"
        "  imagenet-trainer evaluate runs/rn50/checkpoints/best.ckpt --set val=/data/imagenet/val \\\n"
        "      --set real=/data/real.json --set v2=/data/imagenetv2-matched-frequency-format-val \\\n"
        "      --set c=/data/imagenet-c --temperature --csv results.csv --wandb runs/rn50\n"
        "  torchrun --nproc-per-node 8 -m trainer evaluate best.ckpt --set val=/data/val --backend dali_gpu"
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--set", dest="sets", action="append", required=True, metavar="NAME=PATH",
                   help="a set to evaluate on (repeatable)")
    p.add_argument("--weights", choices=WEIGHTS, default=None,
                   help="a checkpoint's EMA or raw weights (default: the EMA when it has one)")
    p.add_argument("--backend", choices=BACKENDS, default="torchvision",
                   help="how images are decoded and resized (default: torchvision)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes, or DALI threads (default: 4, at most the CPUs)")
    p.add_argument("--temperature", action="store_true",
                   help="fit one temperature on val (minimum NLL) and report every set's ECE and NLL with it too")
    p.add_argument("--json", dest="as_json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--csv", metavar="OUT", help="write timm validate.py's CSV columns, one row per set, to OUT")
    p.add_argument("--wandb", metavar="RUN", help="log the results as a W&B table into RUN: a run directory (its "
                                                  "wandb_run_id file) or a W&B run id")
    p.add_argument("--wandb-project", default="imagenet-trainer", help="the project of a run given by id")


# -- scoring ----------------------------------------------------------------------------------------
def _calibration(logits, labels, temperature: float | None) -> dict[str, float]:
    from trainer.artifacts import eval_metrics as m

    out = {"ece": m.expected_calibration_error(logits, labels, ECE_BINS), "nll": m.negative_log_likelihood(logits, labels)}
    if temperature is not None:
        out["ece_t"] = m.expected_calibration_error(logits / temperature, labels, ECE_BINS)
        out["nll_t"] = m.negative_log_likelihood(logits / temperature, labels)
    return out


def _scored(logits, labels, temperature: float | None) -> dict[str, Any]:
    from trainer.artifacts import eval_metrics as m

    acc = m.accuracy(logits, labels, (1, 5))
    return {"images": int(labels.numel()), "top1": acc[1], "top5": acc[5], **_calibration(logits, labels, temperature)}


def _indices(wnids: list[str], classes: list[str]):
    import torch

    where = {c: i for i, c in enumerate(classes)}
    return torch.tensor([where[w] for w in wnids], dtype=torch.int64)


def _real(logits, real: list[list[int]], temperature: float | None) -> dict[str, Any]:
    """ReaL's accuracies, and its calibration: ECE with an image counted right when its top-1 is
    among its labels (the label scored is then the top-1, else the list's first), NLL of the
    probability given to its list, -log sum_{y in list} p(y)."""
    import torch

    from trainer.artifacts import eval_metrics as m

    acc, used = m.real_accuracy(logits, real, (1, 5))
    keep = [i for i, labels in enumerate(real) if labels]
    z = logits[keep]
    pred = z.argmax(1).tolist()
    labels = torch.tensor([p if p in real[i] else real[i][0] for p, i in zip(pred, keep)], dtype=torch.int64)

    def nll(scaled) -> float:
        logp = scaled.double().log_softmax(1)
        return -sum(torch.logsumexp(logp[r, real[i]], 0).item() for r, i in enumerate(keep)) / len(keep)

    out = {"images": used, "top1": acc[1], "top5": acc[5],
           "ece": m.expected_calibration_error(z, labels, ECE_BINS), "nll": nll(z)}
    if temperature is not None:
        out["ece_t"] = m.expected_calibration_error(z / temperature, labels, ECE_BINS)
        out["nll_t"] = nll(z / temperature)
    return out


def score_sets(sets, outputs: dict[str, Any], model_classes: list[str], temperature: bool = False) -> dict[str, Any]:
    """Every set's results from its logits (``outputs[name]``, in the set's image order): the
    accuracies (fractions), calibration, and each kind's own (ReaL's images used, A/R's clean
    top-1, C's corruption summary). Returns ``{"temperature", "sets": [...]}``."""
    import torch

    from trainer.artifacts import eval_metrics as m
    from trainer.artifacts.evalsets import imagenet1k_wnids, val_numbers

    val = next((s for s in sets if s.kind == "val"), None)
    val_labels = _indices(val.wnids, model_classes) if val is not None else None
    t = None
    if temperature:
        t = m.fit_temperature(outputs[val.name], val_labels)
    results = []
    for s in sets:
        logits = outputs.get(s.name)
        row: dict[str, Any] = {"set": s.name, "kind": s.kind, "path": str(s.path)}
        if s.kind == "val":
            row.update(_scored(logits, val_labels, t))
        elif s.kind == "real":
            index = {w: i for i, w in enumerate(model_classes)}
            in1k = imagenet1k_wnids(model_classes, val, s.describe())
            numbers = val_numbers(val)
            rows = [i for i, n in enumerate(numbers) if n is not None and n <= len(s.real)]
            # ReaL's indices count ImageNet-1k's sorted wnids; the model's columns its own classes.
            lists = [[index[in1k[c]] for c in s.real[numbers[i] - 1]] for i in rows]
            row.update(_real(outputs[val.name][rows], lists, t))
            row.update(val_images=len(val), matched=len(rows), empty=sum(1 for x in lists if not x))
        elif s.kind == "v2":
            in1k = imagenet1k_wnids(model_classes, val, s.describe())
            row.update(_scored(logits, _indices([in1k[c] for c in s.class_indices], model_classes), t))
        elif s.kind in ("a", "r"):
            sub, _ = m.restrict(logits, model_classes, s.classes)
            row.update(_scored(sub, _indices(s.wnids, s.classes), t))
            row["classes"] = len(s.classes)
            clean = None
            if val is not None:
                mine = [i for i, w in enumerate(val.wnids) if w in set(s.classes)]
                if mine:
                    vsub, _ = m.restrict(outputs[val.name][mine], model_classes, s.classes)
                    labels = _indices([val.wnids[i] for i in mine], s.classes)
                    clean = {"images": len(mine), "top1": m.accuracy(vsub, labels, (1,))[1]}
            row["clean"] = clean
        elif s.kind == "c":
            labels = _indices(s.wnids, model_classes)
            row.update(_scored(logits, labels, t))
            pred = logits.argmax(1)
            errors: dict[str, dict[int, float]] = {}
            number = {g: i for i, g in enumerate(dict.fromkeys(s.groups))}
            groups = torch.tensor([number[g] for g in s.groups])
            for g, i in number.items():
                mask = groups == i
                errors.setdefault(g[0], {})[g[1]] = 1.0 - (pred[mask] == labels[mask]).double().mean().item()
            clean_error = None
            if val is not None:
                clean_error = 1.0 - m.accuracy(outputs[val.name], val_labels, (1,))[1]
            row["corruption"] = m.corruption_summary(errors, clean_error)
        else:  # sketch
            row.update(_scored(logits, _indices(s.wnids, model_classes), t))
        results.append(row)
    top1_val = next((r["top1"] for r in results if r["kind"] == "val"), None)
    for r in results:
        r["top1_diff"] = None if top1_val is None else r["top1"] - top1_val
    return {"temperature": t, "sets": results}


# -- outputs ---------------------------------------------------------------------------------------
def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The terminal's table: one row per set (percentages), then each kind's details."""
    t = report["temperature"]
    head = ["set", "images", "top1", "top5", "top1_diff", "ECE", "NLL"] + (["ECE@T", "NLL@T"] if t else [])
    rows = []
    for r in report["sets"]:
        row = [r["set"], str(r["images"]), _pct(r["top1"]), _pct(r["top5"]),
               "-" if r["top1_diff"] is None else f"{100 * r['top1_diff']:+.2f}", _pct(r["ece"]), f"{r['nll']:.4f}"]
        if t:
            row += [_pct(r["ece_t"]), f"{r['nll_t']:.4f}"]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [f"{report['model']} ({report['weights']} weights, {report['param_count']:.2f}M parameters, "
           f"resize {report['resize']}, crop {report['crop']}, {report['backend']})", line(head)]
    out += [line(row) for row in rows]
    notes = []
    if t:
        notes.append(f"temperature T = {t:.4f}, fitted on val (minimum NLL); ECE@T and NLL@T use logits / T")
    for r in report["sets"]:
        if r["kind"] == "real":
            notes.append(f"{r['set']}: {r['images']} of the {r['val_images']} val images scored ({r['matched']} "
                         f"matched by file name ILSVRC2012_val_%08d, {r['empty']} with no ReaL label left out)")
        elif r["kind"] in ("a", "r"):
            clean = r["clean"]
            notes.append(f"{r['set']}: scored on its {r['classes']} classes' logits; " + (
                f"clean top-1 on val's {clean['images']} images of those classes: {_pct(clean['top1'])}"
                if clean else "no clean top-1 (no val set, or val has none of its classes)"))
        elif r["kind"] == "c":
            notes.append(_format_corruption(r["set"], r["corruption"]))
    return "\n".join(out + [""] + notes if notes else out)


def _format_corruption(name: str, c: dict) -> str:
    severities = sorted(c["severity_error"])
    head = ["corruption", "error"] + [f"s{s}" for s in severities] + ["CE", "rel CE"]
    rows = []
    for corruption, r in c["corruptions"].items():
        rows.append([corruption, _pct(r["error"])] + [_pct(r["severities"].get(s)) for s in severities]
                    + [_pct(r["ce"]), _pct(r["relative_ce"])])
    rows.append(["mean", _pct(c["mean_error"])] + [_pct(c["severity_error"][s]) for s in severities]
                + [_pct(c["mce"]), _pct(c["relative_mce"])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = [f"{name}: top-1 error (%) per corruption and severity; CE and relative CE against AlexNet's "
             f"(hendrycks/robustness), mCE {_pct(c['mce'])}, relative mCE {_pct(c['relative_mce'])}"
             + ("" if c["clean_error"] is not None else " (relative CE needs --set val)")]
    lines += ["  " + "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
              for row in [head] + rows]
    lines += [f"  {k}: left out of mCE, {why}" for k, why in c["left_out"].items()]
    return "\n".join(lines)


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """timm validate.py's results rows (percentages rounded to 4 places, parameters in millions),
    one per set, with ``top1_diff`` (against val) and ``set``."""
    rows = []
    for r in report["sets"]:
        top1, top5 = 100 * r["top1"], 100 * r["top5"]
        rows.append({
            "model": report["model"], "top1": round(top1, 4), "top1_err": round(100 - top1, 4),
            "top5": round(top5, 4), "top5_err": round(100 - top5, 4),
            "param_count": round(report["param_count"], 2), "img_size": report["crop"],
            "crop_pct": 1.0 if r["kind"] == "c" else report["crop_pct"], "interpolation": report["interpolation"],
            "top1_diff": "" if r["top1_diff"] is None else round(100 * r["top1_diff"], 4), "set": r["set"],
        })
    return rows


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    from data_pipelines import files

    buffer = __import__("io").StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    files.write_atomic(Path(path), buffer.getvalue(), fsync=False)


def wandb_target(target: str) -> tuple[str, Path]:
    """(run id, folder its files go under) of ``--wandb RUN``: a run directory, whose
    ``wandb_run_id`` names the run (its offline files then go under ``RUN/wandb``, as the fit's
    did), or a run id (files under the current folder)."""
    from trainer.tracking import RUN_ID_FILE, read_run_id

    folder = Path(target)
    if folder.is_dir():
        run_id = read_run_id(folder)
        if run_id is None:
            raise ValueError(f"--wandb {target}: the folder has no {RUN_ID_FILE} file (written by a fit that "
                             f"logged to W&B); give the run id instead")
        return run_id, folder
    if "/" in target or not target.strip():
        raise ValueError(f"--wandb {target}: neither a run directory nor a W&B run id")
    return target, Path.cwd()


def log_wandb(target: str, project: str, report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Log ``rows`` as the table ``evaluate/results`` (and each set's numbers in the summary) into
    the W&B run ``target`` (:func:`wandb_target`), resumed; returns its id."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("--wandb needs the wandb package: pip install 'imagenet-trainer[wandb]'") from None

    from trainer.tracking import resolve_mode

    run_id, save_dir = wandb_target(target)
    mode, _ = resolve_mode("online", os.environ)
    if mode == "disabled":
        raise RuntimeError("--wandb: W&B is disabled here (WANDB_MODE=disabled)")
    run = wandb.init(id=run_id, resume="allow", project=project, dir=str(save_dir), mode=mode,
                     settings=wandb.Settings(silent=True))
    try:
        table = wandb.Table(columns=list(CSV_COLUMNS), data=[[row[c] for c in CSV_COLUMNS] for row in rows])
        summary = {f"evaluate/{r['set']}/{k}": r[k] for r in report["sets"] for k in ("top1", "top5", "ece", "nll")}
        run.log({"evaluate/results": table, **summary})
        run.summary.update(summary)
    finally:
        run.finish()
    return run_id


# -- the verb --------------------------------------------------------------------------------------
def _fail(message: str, code: int = 2) -> int:
    print(f"{VERB}: {message}", file=sys.stderr)
    return code


def _read_sets(texts: list[str]):
    """The sets named, their layouts checked, val first (the others compare with it, and
    --temperature is fitted on it)."""
    from trainer.artifacts.evalsets import EvalSetError, read_set

    sets = [read_set(t) for t in texts]
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvalSetError(f"--set {repeated[0]} is given twice: give each set once (or name variants "
                           f"{repeated[0]}-a, {repeated[0]}-b)")
    if sum(s.kind == "val" for s in sets) > 1:
        raise EvalSetError("more than one val set: give --set val=PATH once")
    for s in sets:
        if s.kind == "real" and not any(v.kind == "val" for v in sets):
            raise EvalSetError(f"{s.describe()}: ReaL labels the val images: add --set val=PATH")
    return sorted(sets, key=lambda s: s.kind != "val")


def _check_classes(sets, classes: list[str]) -> None:
    """Every set's labels name classes of the model (an EvalSetError names those that do not)."""
    from trainer.artifacts.evalsets import check_wnids, imagenet1k_wnids

    val = next((s for s in sets if s.kind == "val"), None)
    for s in sets:
        if s.kind in ("v2", "real"):
            imagenet1k_wnids(classes, val, s.describe())
        else:
            check_wnids(s, classes)


def main(args: argparse.Namespace) -> int:
    from trainer.artifacts.evalsets import EvalSetError

    if args.batch_size < 1 or args.workers < 0:
        return _fail(f"--batch-size={args.batch_size} must be at least 1 and --workers={args.workers} at least 0")
    try:
        sets = _read_sets(args.sets)
    except EvalSetError as err:
        return _fail(str(err))
    if args.temperature and not any(s.kind == "val" for s in sets):
        return _fail("--temperature fits T on val: add --set val=PATH")
    if args.wandb:
        try:
            wandb_target(args.wandb)  # checked before the work, not after it
        except ValueError as err:
            return _fail(str(err))
    try:
        from trainer.artifacts.pretrained import load_pretrained

        pretrained = load_pretrained(args.model, weights=args.weights)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        return _fail(str(err))
    try:
        _check_classes(sets, list(pretrained.classes))
    except EvalSetError as err:
        return _fail(str(err))
    try:
        report = evaluate(pretrained, sets, backend=args.backend, batch_size=args.batch_size, workers=args.workers,
                          temperature=args.temperature)
    except (ValueError, EvalSetError) as err:
        return _fail(str(err))
    except RuntimeError as err:
        return _fail(str(err), 1)
    report.update(model=str(args.model), weights=pretrained.meta.get("weights", "raw"))
    from trainer.artifacts.inference import current_ranks

    if current_ranks().rank != 0:  # every rank holds the results; one writes them
        return _finish(0)
    rows = csv_rows(report)
    print(json.dumps(report, indent=2, default=str) if args.as_json else format_table(report))
    if args.csv:
        write_csv(args.csv, rows)
    if args.wandb:
        try:
            run_id = log_wandb(args.wandb, args.wandb_project, report, rows)
        except (ValueError, RuntimeError) as err:
            return _finish(_fail(str(err)))
        if not args.as_json:
            print(f"W&B: the table evaluate/results was logged into run {run_id}")
    return _finish(0)


def _finish(code: int) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank closes its connections while another still gathers
        dist.destroy_process_group()
    return code


def evaluate(pretrained, sets, *, backend: str = "torchvision", batch_size: int = 64, workers: int = 4,
             temperature: bool = False) -> dict[str, Any]:
    """Run the model over every set (:func:`inference.forward_source`) and score them
    (:func:`score_sets`); the report also says the model's size and preprocessing."""
    from trainer.artifacts.inference import forward_source, preprocessing

    outputs = {}
    for s in sets:
        if s.source is None:  # ReaL: val's logits
            continue
        # ImageNet-C is 224x224 already: the centre crop alone, as its authors evaluate it.
        outputs[s.name] = forward_source(pretrained, s.source, batch_size=batch_size, backend=backend,
                                         workers=workers, resize=0 if s.kind == "c" else None)
    report = score_sets(sets, outputs, list(pretrained.classes), temperature)
    prep = preprocessing(pretrained)
    report.update(
        param_count=sum(p.numel() for p in pretrained.model.parameters()) / 1e6,
        resize=prep["resize"], crop=prep["crop"], crop_pct=round(prep["crop"] / prep["resize"], 4),
        interpolation=prep.get("interpolation", "bilinear"), backend=backend,
    )
    return report
