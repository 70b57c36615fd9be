"""`imagenet-trainer evaluate`: small sets in the real layouts (real JPEGs), a 1000-class resnet18
whose classifier is fitted to them (so that a wrong label would show), scored against independent
computations: the model run image by image on its own preprocessing, torchmetrics' ECE."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.evalsets import CROP, c_tree, model_file, real_json, v2_tree, val_tree, wnid_tree, wnids
from trainer.cli import main as cli

REPO = Path(__file__).resolve().parent.parent
W = wnids(1000)  # ImageNet-1k's shape: 1,000 sorted wnids, class index i = n{i:08d}
VAL_CLASSES = [W[0], W[2], W[5], W[10], W[20]]
A_CLASSES = [W[2], W[5], W[20]]
R_CLASSES = [W[0], W[10]]
SKETCH_CLASSES = [W[5], W[10]]
C_CLASSES = [W[0], W[10]]
V2_INDICES = [0, 2, 10]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches, shared cores
    yield
    torch.set_num_threads(threads)


def _fit_classifier(path: Path, labelled: list[tuple[str, str]]) -> None:
    """Make the model's fc a least-squares fit of the images' one-hot labels on their pooled
    features (more dimensions than images: every fitted image right), so that a mislabelled image
    of a fitted set shows as a lower score; the classes without images get a low bias."""
    from trainer.artifacts.inference import forward_images
    from trainer.artifacts.pretrained import load_pretrained

    x = forward_images(load_pretrained(path), [f for f, _ in labelled], output="features", workers=0).double()
    centre = x.mean(0)
    xc = x - centre
    seen = sorted({w for _, w in labelled})
    y = torch.full((len(labelled), len(seen)), -1.0, dtype=torch.float64)
    for i, (_, w) in enumerate(labelled):
        y[i, seen.index(w)] = 1.0
    fitted = torch.linalg.solve(xc.T @ xc + 1e-3 * torch.eye(x.shape[1], dtype=torch.float64), xc.T @ y)  # [512, K]
    state = torch.load(path, weights_only=True)
    weight, bias = torch.zeros(1000, x.shape[1]), torch.full((1000,), -20.0)
    for k, wnid in enumerate(seen):
        i = W.index(wnid)
        weight[i] = 3 * fitted[:, k].float()
        bias[i] = -(weight[i] @ centre.float())
    state["fc.weight"], state["fc.bias"] = weight, bias
    torch.save(state, path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evalsets")
    out = {"val": root / "val", "v2": root / "v2", "a": root / "a", "r": root / "r", "sketch": root / "sketch",
           "c": root / "c"}
    labelled = []
    val_files = val_tree(out["val"], VAL_CLASSES, per_class=2)  # ILSVRC2012_val_00000001 .. 10
    labelled += [(str(f), f.parent.name) for f in val_files]
    for index, files in v2_tree(out["v2"], V2_INDICES, per_class=2).items():
        labelled += [(str(f), W[index]) for f in files]
    for name, classes, seed in (("a", A_CLASSES, 3), ("r", R_CLASSES, 4), ("sketch", SKETCH_CLASSES, 5)):
        labelled += [(str(f), f.parent.name) for f in wnid_tree(out[name], classes, per_class=2, seed=seed)]
    c_files = c_tree(out["c"], ["gaussian_noise"], [1, 2], C_CLASSES, per_class=2)
    # Fitted on all but ImageNet-C and half of val (numbers 6-10), whose scores are then the
    # model's own, errors included.
    labelled = [(f, w) for f, w in labelled if "ILSVRC2012_val_" not in f or int(Path(f).stem[-8:]) <= 5]
    # ReaL: one list per val image in number order, one empty (3), one with two labels (5); two
    # more entries than val images (as the real file has 50,000 for any subset).
    lists = [[W.index(f.parent.name)] for f in val_files] + [[1], [2]]
    lists[2] = []
    lists[4] = [W.index(val_files[4].parent.name), 999]
    lists[6] = [999]  # a ReaL label that differs from the val label
    out["real"] = real_json(root / "real.json", lists)
    out["model"] = model_file(root / "rn18-1k.pt", W)
    _fit_classifier(out["model"], labelled)
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli(["evaluate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def evaluate_json(capsys, model, *set_args, extra=()) -> dict:
    args = [model] + [a for s in set_args for a in ("--set", s)] + ["--json", "--workers", "0", *extra]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads(out)
    report["by_set"] = {r["set"]: r for r in report["sets"]}
    return report


def model_logits(model_path: Path, files, resize=True) -> torch.Tensor:
    """The model on each image alone, through its own preprocessing (pretrained.preprocess) or,
    for ImageNet-C, a centre crop of the image as it is."""
    from torchvision.transforms import functional as F

    from data_pipelines.sources import load_rgb
    from trainer.artifacts.pretrained import load_pretrained

    p = load_pretrained(model_path)
    prep = p.meta["preprocessing"]
    rows = []
    with torch.inference_mode():
        for f in files:
            image = load_rgb(str(f))
            x = p.preprocess(image) if resize else F.normalize(F.to_tensor(F.center_crop(image, [CROP])),
                                                               prep["mean"], prep["std"])
            rows.append(p.model(x[None])[0])
    return torch.stack(rows)


def images_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))


def test_v2_folders_are_class_indices_read_as_numbers(sets, capsys):
    report = evaluate_json(capsys, sets["model"], f"v2={sets['v2']}")
    files = images_of(sets["v2"])
    truth = torch.tensor([int(f.parent.name) for f in files])  # folder "10" is class 10, not the 2nd folder
    top1 = (model_logits(sets["model"], files).argmax(1) == truth).double().mean().item()
    got = report["by_set"]["v2"]
    assert got["images"] == 6
    assert got["top1"] == pytest.approx(top1)
    assert top1 == 1.0  # the fitted classifier: a string sort ("10" before "2") would score 4 of 6


def test_val_and_calibration_against_torchmetrics(sets, capsys):
    from torchmetrics.classification import MulticlassCalibrationError

    report = evaluate_json(capsys, sets["model"], f"val={sets['val']}")
    files = images_of(sets["val"])
    labels = torch.tensor([W.index(f.parent.name) for f in files])
    logits = model_logits(sets["model"], files)
    val = report["by_set"]["val"]
    assert val["images"] == 10 and val["top1_diff"] == 0.0
    assert val["top1"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    top5 = (logits.topk(5, 1).indices == labels[:, None]).any(1).double().mean().item()
    assert val["top5"] == pytest.approx(top5)
    ece = MulticlassCalibrationError(num_classes=1000, n_bins=15, norm="l1")(logits, labels).item()
    assert val["ece"] == pytest.approx(ece, abs=1e-5)
    assert val["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), abs=1e-4)


def test_real_labels_matched_by_file_name_skipping_empty_lists(sets, capsys):
    report = evaluate_json(capsys, sets["model"], f"val={sets['val']}", f"real={sets['real']}")
    lists = json.loads(sets["real"].read_text())
    files = images_of(sets["val"])  # sorted by class folder, not by number
    numbers = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    pred = model_logits(sets["model"], files).argmax(1).tolist()
    scored = [(p, lists[n - 1]) for p, n in zip(pred, numbers) if lists[n - 1]]
    real = report["by_set"]["real"]
    assert real["images"] == len(scored) == 9 and real["matched"] == 10 and real["empty"] == 1
    assert real["top1"] == pytest.approx(sum(p in labels for p, labels in scored) / 9)
    assert report["by_set"]["real"]["top1_diff"] == pytest.approx(real["top1"] - report["by_set"]["val"]["top1"])


def test_a_and_r_are_scored_on_their_classes_and_report_the_clean_top1(sets, capsys):
    report = evaluate_json(capsys, sets["model"], f"val={sets['val']}", f"a={sets['a']}", f"r={sets['r']}")
    for name, classes in (("a", A_CLASSES), ("r", R_CLASSES)):
        columns = [W.index(w) for w in classes]
        files = images_of(sets[name])
        pred = model_logits(sets["model"], files)[:, columns].argmax(1)
        truth = torch.tensor([classes.index(f.parent.name) for f in files])
        got = report["by_set"][name]
        assert got["classes"] == len(classes) and got["images"] == len(files)
        assert got["top1"] == pytest.approx((pred == truth).double().mean().item())
        val_files = [f for f in images_of(sets["val"]) if f.parent.name in classes]
        vpred = model_logits(sets["model"], val_files)[:, columns].argmax(1)
        vtruth = torch.tensor([classes.index(f.parent.name) for f in val_files])
        assert got["clean"]["images"] == len(val_files)
        assert got["clean"]["top1"] == pytest.approx((vpred == vtruth).double().mean().item())


def test_c_errors_per_corruption_and_severity_without_resize(sets, capsys):
    from trainer.artifacts.eval_metrics import ALEXNET_CLEAN_ERROR, ALEXNET_SEVERITY_ERRORS

    report = evaluate_json(capsys, sets["model"], f"val={sets['val']}", f"c={sets['c']}")
    c = report["by_set"]["c"]["corruption"]
    errors = {}
    for severity in (1, 2):
        files = images_of(sets["c"] / "gaussian_noise" / str(severity))
        truth = torch.tensor([W.index(f.parent.name) for f in files])
        pred = model_logits(sets["model"], files, resize=False).argmax(1)
        errors[severity] = 1 - (pred == truth).double().mean().item()
    got = c["corruptions"]["gaussian_noise"]
    assert {int(k): v for k, v in got["severities"].items()} == pytest.approx(errors)
    alex = ALEXNET_SEVERITY_ERRORS["gaussian_noise"]
    assert c["mce"] == pytest.approx((errors[1] + errors[2]) / (alex[0] + alex[1]))
    clean = 1 - report["by_set"]["val"]["top1"]
    assert c["relative_mce"] == pytest.approx((errors[1] + errors[2] - 2 * clean)
                                              / (alex[0] + alex[1] - 2 * ALEXNET_CLEAN_ERROR))


def test_table_csv_and_temperature(sets, capsys, tmp_path):
    from trainer.artifacts.eval_metrics import fit_temperature

    out = tmp_path / "results.csv"
    code, text, err = run(capsys, sets["model"], "--set", f"val={sets['val']}", "--set", f"sketch={sets['sketch']}",
                          "--set", f"c={sets['c']}", "--temperature", "--csv", out, "--workers", "0")
    assert code == 0, err
    files = images_of(sets["val"])
    t = fit_temperature(model_logits(sets["model"], files), torch.tensor([W.index(f.parent.name) for f in files]))
    assert f"temperature T = {t:.4f}" in text
    lines = text.splitlines()
    assert lines[1].split() == ["set", "images", "top1", "top5", "top1_diff", "ECE", "NLL", "ECE@T", "NLL@T"]
    assert [line.split()[0] for line in lines[2:5]] == ["val", "sketch", "c"]
    assert "mCE" in text and "gaussian_noise" in text
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                             "interpolation", "top1_diff", "set"]
    assert [r["set"] for r in rows] == ["val", "sketch", "c"]
    val = rows[0]
    assert float(val["top1"]) + float(val["top1_err"]) == pytest.approx(100)
    assert val["img_size"] == str(CROP) and val["crop_pct"] == str(round(CROP / 36, 4))
    assert val["param_count"] == "11.69" and val["interpolation"] == "bilinear" and val["top1_diff"] == "0.0"
    assert rows[2]["crop_pct"] == "1.0"  # ImageNet-C: the centre crop alone


def _bad(tmp_path: Path, kind: str) -> tuple[str, str]:
    """A set of ``kind`` laid out wrongly, and what the error must say."""
    if kind == "v2":
        wnid_tree(tmp_path / "v2", [W[1]], per_class=1)
        return f"v2={tmp_path / 'v2'}", "not class indices 0..999"
    if kind == "sketch":
        v2_tree(tmp_path / "s", [3], per_class=1)
        return f"sketch={tmp_path / 's'}", "pass it as --set v2=PATH"
    if kind == "c-wnids":
        wnid_tree(tmp_path / "c", [W[1]], per_class=1)
        return f"c={tmp_path / 'c'}", "<corruption>/<severity 1-5>/<wnid>"
    if kind == "c-severity":
        c_tree(tmp_path / "c", ["fog"], [1], [W[1]], per_class=1)
        (tmp_path / "c" / "fog" / "1").rename(tmp_path / "c" / "fog" / "7")
        return f"c={tmp_path / 'c'}", "are not severities 1-5"
    if kind == "val-flat":
        wnid_tree(tmp_path, ["val"], per_class=1)
        return f"val={tmp_path / 'val'}", "its images lie directly in it"
    if kind == "real":
        (tmp_path / "real.json").write_text("{not json")
        return f"real={tmp_path / 'real.json'}", "is not readable JSON"
    if kind == "empty-class":
        (tmp_path / "a" / W[1]).mkdir(parents=True)
        return f"a={tmp_path / 'a'}", "holds no images"
    if kind == "missing":
        return f"r={tmp_path / 'nothing'}", "does not exist"
    return f"imagenet-x={tmp_path}", "NAME one of val, real, v2"


@pytest.mark.parametrize("kind", ["v2", "sketch", "c-wnids", "c-severity", "val-flat", "real", "empty-class",
                                  "missing", "unknown"])
def test_each_layout_error_names_the_path_and_the_layout(sets, capsys, tmp_path, kind):
    spec, expected = _bad(tmp_path, kind)
    extra = ["--set", f"val={sets['val']}"] if kind == "real" else []
    code, out, err = run(capsys, sets["model"], "--set", spec, *extra)
    assert code == 2 and out == ""
    assert err.startswith("imagenet-trainer evaluate: ") and expected in err, err
    assert str(tmp_path) in err or kind == "unknown"


def test_a_set_with_a_wnid_the_model_lacks_is_refused_by_name(sets, capsys, tmp_path):
    wnid_tree(tmp_path / "sketch", [W[3], "n99999999"], per_class=1)
    code, _, err = run(capsys, sets["model"], "--set", f"sketch={tmp_path / 'sketch'}")
    assert code == 2 and "n99999999" in err and "1 of the set's 2 wnids" in err


def test_v2_and_real_need_a_model_of_imagenet1k_classes(sets, capsys, tmp_path):
    small = model_file(tmp_path / "small.pt", wnids(12))
    code, _, err = run(capsys, small, "--set", f"v2={sets['v2']}")
    assert code == 2 and "ImageNet-1k class indices" in err and "this model has 12 classes" in err
    code, _, err = run(capsys, small, "--set", f"real={sets['real']}")
    assert code == 2 and "add --set val=PATH" in err


def test_temperature_without_val_and_a_run_without_its_id_are_refused_at_start(sets, capsys, tmp_path):
    code, _, err = run(capsys, sets["model"], "--set", f"sketch={sets['sketch']}", "--temperature")
    assert code == 2 and "--temperature fits T on val" in err
    code, out, err = run(capsys, sets["model"], "--set", f"sketch={sets['sketch']}", "--wandb", tmp_path)
    assert code == 2 and out == "" and f"--wandb {tmp_path}: the folder has no wandb_run_id file" in err


@pytest.mark.slow
def test_wandb_table_in_an_offline_run(sets, capsys, tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb_run_id").write_text("evalrun1\n")
    code, out, err = run(capsys, sets["model"], "--set", f"val={sets['val']}", "--set", f"v2={sets['v2']}",
                         "--wandb", run_dir, "--workers", "0")
    assert code == 0, err
    assert "logged into run evalrun1" in out
    (offline,) = sorted((run_dir / "wandb").glob("offline-run-*-evalrun1"))
    (table_file,) = sorted(offline.glob("files/media/table/evaluate/results_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size",
                                "crop_pct", "interpolation", "top1_diff", "set"]
    assert [row[-1] for row in table["data"]] == ["val", "v2"]


@pytest.mark.slow
def test_two_processes_count_each_image_once(sets, capsys, tmp_path):
    specs = [f"val={sets['val']}", f"real={sets['real']}", f"v2={sets['v2']}", f"c={sets['c']}"]
    args = [str(sets["model"])] + [a for s in specs for a in ("--set", s)] + ["--json", "--workers", "0",
                                                                             "--batch-size", "3"]
    single = evaluate_json(capsys, sets["model"], *specs, extra=["--batch-size", "3"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "GROUP_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "evaltest",
               "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, "-m", "trainer", "evaluate", *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert outs[1][0] == ""  # rank 1 prints nothing
    two = json.loads(outs[0][0])
    for a, b in zip(single["sets"], two["sets"]):
        assert a["set"] == b["set"] and a["images"] == b["images"]
        for key in ("top1", "top5", "ece", "nll"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)  # batches split differently
    assert two["sets"][0]["images"] == 10 and two["sets"][3]["images"] == 8


def test_val_from_a_pack_scores_as_its_tree(sets, capsys, tmp_path):
    import shutil

    from data_pipelines.pack import pack

    root = tmp_path / "tree"
    shutil.copytree(sets["val"], root / "val")
    shutil.copytree(sets["val"], root / "train")  # a pack holds both splits
    pack(root, tmp_path / "pack", shard_size="8KB", workers=1, progress=False)
    tree = evaluate_json(capsys, sets["model"], f"val={sets['val']}", f"real={sets['real']}")
    packed = evaluate_json(capsys, sets["model"], f"val={tmp_path / 'pack'}", f"real={sets['real']}")
    for a, b in zip(tree["sets"], packed["sets"]):
        assert a["images"] == b["images"] and a["top1"] == pytest.approx(b["top1"]) and a["nll"] == pytest.approx(b["nll"])


def test_dali_cpu_backend_scores_every_image(sets, capsys):
    from tests.conftest import skip_without_dali

    skip_without_dali()
    specs = (f"val={sets['val']}", f"c={sets['c']}")
    tv = evaluate_json(capsys, sets["model"], *specs)
    dali = evaluate_json(capsys, sets["model"], *specs, extra=["--backend", "dali_cpu"])
    for a, b in zip(tv["sets"], dali["sets"]):
        # DALI's decoder and resize are not Pillow's: the same images, close scores.
        assert a["images"] == b["images"] and abs(a["top1"] - b["top1"]) <= 0.25
