"""`imagenet-trainer features` and the `linear_probe` recipe: the dump is the model's pooled output
(checked with a forward hook on fc, image by image), in DINO's files, shapes and dtypes, labelled
through the model's wnids; bad sets are refused by name; a linear probe trains fc alone."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.evalsets import model_file, wnid_tree, wnids
from trainer.artifacts.pretrained import load_pretrained
from trainer.cli import main as cli

MODEL_CLASSES = wnids(5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A resnet18 of 5 classes; a train set of 3 of its wnids (not the first: labels must be the
    model's indices, not the folders'), a val set of 2; the features written by the verb."""
    root = tmp_path_factory.mktemp("features")
    model = model_file(root / "model.pt", MODEL_CLASSES)
    wnid_tree(root / "data" / "train", [MODEL_CLASSES[i] for i in (1, 3, 4)], per_class=3)
    wnid_tree(root / "data" / "val", [MODEL_CLASSES[i] for i in (3, 4)], per_class=2, seed=9)
    out = root / "feats"
    code = cli(["features", str(model), "--set", f"train={root / 'data' / 'train'}",
                "--set", f"val={root / 'data' / 'val'}", "--out", str(out), "--workers", "0", "--batch-size", "4"])
    assert code == 0
    return model, root / "data", out


def _pooled(pretrained, files):
    """The input of fc for ``files``, computed here: each image through the model's own
    ``preprocess`` (PIL), stacked, and a forward hook on fc."""
    seen = []
    handle = pretrained.model.fc.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    images = []
    for f in files:
        with Image.open(f) as img:
            images.append(pretrained.preprocess(img.convert("RGB")))
    with torch.no_grad():
        pretrained.model(torch.stack(images))
    handle.remove()
    return seen[0]


def test_the_rows_are_the_models_pooled_features_of_the_listed_files(setup):
    model, data, out = setup
    pretrained = load_pretrained(model)
    for name, split in (("train", "train"), ("test", "val")):
        files = [data / split / line for line in (out / f"{name}files.txt").read_text().splitlines()]
        features = torch.load(out / f"{name}feat.pth", weights_only=True)
        torch.testing.assert_close(features, _pooled(pretrained, files), atol=1e-5, rtol=1e-5)
        assert len({tuple(r.tolist()) for r in features}) == len(files)  # every image its own row


def test_the_files_are_dinos_with_labels_through_the_models_wnids(setup):
    _, data, out = setup
    train = torch.load(out / "trainfeat.pth", weights_only=True)
    train_labels = torch.load(out / "trainlabels.pth", weights_only=True)
    test = torch.load(out / "testfeat.pth", weights_only=True)
    test_labels = torch.load(out / "testlabels.pth", weights_only=True)
    assert (train.dtype, tuple(train.shape), test.dtype, tuple(test.shape)) == (torch.float32, (9, 512),
                                                                               torch.float32, (4, 512))
    assert (train_labels.dtype, tuple(train_labels.shape), test_labels.dtype) == (torch.int64, (9,), torch.int64)
    # ImageFolder's order: folders sorted, then files; each label the model's index of the folder's wnid.
    lines = (out / "trainfiles.txt").read_text().splitlines()
    assert lines == sorted(lines) and len(lines) == 9
    assert train_labels.tolist() == [MODEL_CLASSES.index(Path(p).parent.name) for p in lines]
    assert train_labels.tolist() == [1] * 3 + [3] * 3 + [4] * 3
    assert test_labels.tolist() == [3, 3, 4, 4]
    info = json.loads((out / "features.json").read_text())
    assert info["classes"] == MODEL_CLASSES and info["arch"] == "resnet18" and info["dim"] == 512
    assert info["l2_normalized"] is False
    assert info["sets"]["train"]["images"] == 9 and info["sets"]["val"]["features"] == "testfeat.pth"
    assert info["sets"]["val"]["path"] == str(data / "val")


def test_knn_on_a_set_against_itself_finds_each_image(setup, tmp_path, capsys):
    model, data, _ = setup
    out = tmp_path / "same"
    assert cli(["features", str(model), "--set", f"train={data / 'val'}", "--set", f"val={data / 'val'}",
                "--out", str(out), "--workers", "0", "--l2-normalize"]) == 0
    assert torch.load(out / "trainfeat.pth", weights_only=True).norm(dim=1).sub(1).abs().max() < 1e-5
    assert "next: imagenet-trainer knn" in capsys.readouterr().out
    assert cli(["knn", str(out), "--k", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["results"] == [{"k": 1, "top1": 1.0, "top5": 1.0}] and result["num_classes"] == 5


def test_train_and_val_may_come_from_two_runs_of_one_model_not_of_two(setup, tmp_path, capsys):
    model, data, _ = setup
    out = tmp_path / "two_runs"
    common = ["--out", str(out), "--workers", "0"]
    assert cli(["features", str(model), "--set", f"train={data / 'train'}", *common]) == 0
    assert cli(["features", str(model), "--set", f"val={data / 'val'}", *common]) == 0
    info = json.loads((out / "features.json").read_text())
    assert (info["sets"]["train"]["images"], info["sets"]["val"]["images"]) == (9, 4)
    assert cli(["knn", str(out), "--k", "3"]) == 0
    # val again from another model: the train features left there are not its; knn says so.
    other = model_file(tmp_path / "other.pt", MODEL_CLASSES, seed=1)
    assert cli(["features", str(other), "--set", f"val={data / 'val'}", *common]) == 0
    capsys.readouterr()
    assert cli(["knn", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trainfeat.pth has 9 rows but" in err and "describes no train set" in err


def test_a_folder_the_model_lacks_is_refused_unless_classes_come_from_the_folders(setup, tmp_path, capsys):
    model, data, _ = setup
    shutil.copytree(data / "train", tmp_path / "train")
    wnid_tree(tmp_path / "train", ["n09999999"], per_class=1)
    args = ["features", str(model), "--set", f"train={tmp_path / 'train'}", "--out", str(tmp_path / "o"),
            "--workers", "0"]
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagenet-trainer features: ") and "n09999999" in err and "--classes folders" in err
    assert not (tmp_path / "o").exists()
    assert cli(args + ["--classes", "folders"]) == 0
    labels = torch.load(tmp_path / "o" / "trainlabels.pth", weights_only=True)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3]  # n00000001, 3, 4, n09999999: sorted folders
    assert json.loads((tmp_path / "o" / "features.json").read_text())["classes"] == [
        "n00000001", "n00000003", "n00000004", "n09999999"]


def test_bad_sets_are_refused_before_any_work(setup, tmp_path, capsys):
    model, data, _ = setup
    base = ["features", str(model), "--out", str(tmp_path / "o")]
    (tmp_path / "only_val").mkdir()
    shutil.copytree(data / "val", tmp_path / "only_val" / "val")
    cases = [
        (["--set", f"train={tmp_path / 'only_val'}"], f"--set train={tmp_path / 'only_val'} looks like a dataset root",
         "without train/"),
        (["--set", f"test={data / 'val'}"], "the sets are train and val", None),
        (["--set", f"train={tmp_path / 'nowhere'}"], "no such folder", None),
        ([], "no --set given", None),
    ]
    for extra, message, hint in cases:
        assert cli(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and (hint is None or hint in err), err


def test_a_set_may_be_a_dataset_root_holding_its_split(setup):
    from trainer.artifacts.features import scan_set

    _, data, _ = setup
    for name in ("train", "val"):
        assert scan_set(name, data) == scan_set(name, data / name)
    assert scan_set("val", data).path == data / "val" and len(scan_set("val", data).files) == 4


def test_an_unreadable_image_fails_naming_the_file(setup, tmp_path, capsys):
    model, data, _ = setup
    shutil.copytree(data / "val", tmp_path / "val")
    bad = tmp_path / "val" / MODEL_CLASSES[3] / "zz_broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    assert cli(["features", str(model), "--set", f"val={tmp_path / 'val'}", "--out", str(tmp_path / "o"),
                "--workers", "0"]) == 1
    assert "zz_broken.JPEG" in capsys.readouterr().err
    assert not (tmp_path / "o" / "testfeat.pth").exists()


@pytest.mark.slow  # two processes, each importing torch and the trainer
def test_two_ranks_write_the_single_process_dump_once(setup, tmp_path):
    model, data, single = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ranks"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "GROUP_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test",
               "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainer", "features", str(model), "--set", f"train={data / 'train'}",
             "--out", str(out), "--workers", "0", "--batch-size", "2"],
            env=env, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]  # rank 0 alone writes
    for name in ("trainfeat.pth", "trainlabels.pth"):
        # 9 train rows in 2 shares of 5 and 4: each image once, in order
        torch.testing.assert_close(torch.load(out / name, weights_only=True),
                                   torch.load(single / name, weights_only=True), atol=1e-5, rtol=1e-5)
    assert (out / "trainfiles.txt").read_text() == (single / "trainfiles.txt").read_text()


# --- the linear_probe recipe ----------------------------------------------------------------------

def test_the_linear_probe_recipe_has_dinos_settings():
    from trainer.config import load_config

    cfg = load_config(["experiment=linear_probe", "data.root=/x"])
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.label_smoothing, o.warmup_epochs, o.schedule) == \
        ("sgd", 0.001, 0.9, False, 0.0, 0.0, 0.0, "cosine")
    assert (cfg.model.freeze, cfg.trainer.max_epochs, cfg.aug.crop, cfg.aug.auto_augment, cfg.aug.mixup_alpha,
            cfg.aug.cutmix_alpha, cfg.aug.random_erasing, cfg.ema.decay) == ("backbone", 100, "rrc", "none", 0.0, 0.0,
                                                                             0.0, None)
    assert (cfg.data.image_size, cfg.data.val_resize) == (224, 256)


@pytest.mark.slow  # a Lightning fit of a resnet18: over 5 s on a small CPU
def test_a_linear_probe_fit_changes_only_fc_and_keeps_batchnorm_statistics(tiny_root, tmp_path):
    from trainer.artifacts.export import plain_state_dict
    from trainer.config import load_config
    from trainer.recipe.models import build_model
    from trainer.run import fit

    torch.manual_seed(5)
    start = build_model("resnet18", 4)
    for m in start.modules():  # statistics a BatchNorm in training mode would visibly move
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    start = start.state_dict()
    init = tmp_path / "start.pt"
    torch.save(start, init)
    fit(load_config([
        "experiment=linear_probe", f"data.root={tiny_root}", "model.arch=resnet18", f"model.init_from={init}",
        "data.backend=torchvision", "data.num_workers=0", "data.batch_size=8", "data.image_size=32",
        "data.val_resize=36", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_epochs=1",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "logger.wandb.mode=disabled",
        f"run.dir={tmp_path / 'run'}"]))
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    after = plain_state_dict(ckpt["state_dict"])
    assert not torch.equal(after["fc.weight"], start["fc.weight"])  # the classifier learnt
    changed = [k for k, v in start.items() if not k.startswith("fc.") and not torch.equal(after[k], v)]
    assert changed == []  # convs, BN affine, running means/vars, num_batches_tracked
    group = ckpt["optimizer_states"][0]["param_groups"]
    assert {(g["momentum"], g["weight_decay"]) for g in group} == {(0.9, 0.0)}
    assert max(g["initial_lr"] for g in group) == pytest.approx(0.001 * 8 / 256)  # DINO's lr x batch / 256
