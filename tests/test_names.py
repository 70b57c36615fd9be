"""Class names travel with the data: a tree's synset_words.txt or a pack's manifest gives the
DataModule's ``names``; a fit keeps them in every checkpoint; ``load_pretrained`` returns them
(from a checkpoint or an export's sidecar); ``predict`` prints ``WNID NAME PROB``; the W&B sample
grid is captioned with them. Checkpoints and exports older than names still load and predict."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from data_pipelines.layout import NAMES_FILE, DataLayoutError

# Five classes: names with synonyms, a name twice (ImageNet has two "crane"s: the wnid identifies),
# a class the file does not name, and a line for a wnid the tree does not have.
SYNSET_WORDS = (
    "n00000000 tench, Tinca tinca\n"
    "n00000001 great white shark, white shark, man-eater\n"
    "n00000002 crane\n"
    "n00000003 crane\n"
    "n09999999 not in this tree\n"
)
NAMES = ["tench, Tinca tinca", "great white shark, white shark, man-eater", "crane", "crane", ""]
SHORT = ["tench", "great white shark", "crane", "crane", None]
WNIDS = [f"n{i:08d}" for i in range(5)]


@pytest.fixture(scope="module")
def named_tree(tmp_path_factory) -> Path:
    """A 5-class sample tree (40 train, 10 val images) with ROOT/synset_words.txt."""
    from data_pipelines.sample import make_sample_tree

    root = make_sample_tree(tmp_path_factory.mktemp("named"), num_classes=5, train_per_class=8, val_per_class=2,
                            image_size=(40, 32))
    (root / NAMES_FILE).write_text(SYNSET_WORDS)
    return root


def _datamodule(root, backend="torchvision", **data):
    from data_pipelines.datamodule import ImageNetDataModule
    from data_pipelines.specs import DataSpec

    return ImageNetDataModule(DataSpec(root=None if root is None else str(root), backend=backend, num_workers=0,
                                       batch_size=4, image_size=32, val_resize=36, seed=0, **data), on_gpu=False)


# --- the data ---------------------------------------------------------------------------------------


def test_a_tree_and_its_pack_give_the_same_names(named_tree, tmp_path):
    from data_pipelines.pack import pack

    assert _datamodule(named_tree, filelist_cache=False).names == NAMES
    assert _datamodule(named_tree, filelist_cache=True).names == NAMES  # the file-list cache's classes
    pack(named_tree, tmp_path / "pack", shard_size="64KB", workers=0)
    packed = _datamodule(tmp_path / "pack")
    assert packed.sharded and packed.classes == WNIDS and packed.names == NAMES
    # Names are read from the manifest alone: no shard is opened for them.
    for tar in (tmp_path / "pack").glob("*.tar"):
        tar.unlink()
    assert _datamodule(tmp_path / "pack").names == NAMES


def test_no_names_file_no_names(tmp_path):
    from data_pipelines.sample import make_sample_tree

    root = make_sample_tree(tmp_path / "plain", num_classes=2, train_per_class=2, val_per_class=1, image_size=(32, 32))
    (root / NAMES_FILE).unlink()  # sample-data names its classes; a tree without the file has none
    assert _datamodule(root, filelist_cache=False).names is None
    assert _datamodule(None, backend="synthetic", num_classes=3).names is None


def test_a_bad_names_line_is_named(tmp_path):
    from data_pipelines.sample import make_sample_tree

    root = make_sample_tree(tmp_path / "bad", num_classes=2, train_per_class=2, val_per_class=1, image_size=(32, 32))
    (root / NAMES_FILE).write_text("n00000000 tench\nn00000001\n")
    with pytest.raises(DataLayoutError, match=re.escape(f"{root / NAMES_FILE}:2: expected 'WNID WORDS'")):
        _datamodule(root, filelist_cache=False).names


# --- an export's sidecar, and predict ------------------------------------------------------------


def _export(path: Path, names: list[str] | None) -> Path:
    """A resnet20 for WNIDS written as `imagenet-trainer export` writes a torchvision export: the
    state_dict and its JSON sidecar (with ``names`` when given)."""
    from trainer.artifacts.export import preprocessing, sidecar_path
    from trainer.recipe.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("resnet20", len(WNIDS)).state_dict(), path)
    meta = {"format": "torchvision", "arch": "resnet20", "num_classes": len(WNIDS), "blurpool": False,
            "classes": WNIDS, "preprocessing": preprocessing(36, 32), "weights": "raw", "source": {}}
    if names is not None:
        meta["names"] = names
    sidecar_path(path).write_text(json.dumps(meta))
    return path


def _predict(capsys, *args: str) -> tuple[int, str, str]:
    from trainer.cli import main

    capsys.readouterr()  # what came before (a fit's progress lines)
    code = main(["predict", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _entries(line: str) -> list[tuple[str, str | None, float]]:
    """``PATH  WNID [NAME] PROB  WNID [NAME] PROB ...`` split at its two-space separators."""
    parts = line.split("  ")[1:]
    found = []
    for part in parts:
        wnid, _, rest = part.partition(" ")
        name, _, prob = rest.rpartition(" ")
        found.append((wnid, name or None, float(prob)))
    return found


def test_predict_prints_wnid_name_and_prob_from_a_sidecars_names(named_tree, tmp_path, capsys):
    from trainer.artifacts.pretrained import load_pretrained

    model = _export(tmp_path / "named.pt", NAMES)
    pretrained = load_pretrained(model)
    assert pretrained.names == NAMES
    _, _, classes, meta = pretrained  # still unpacks as four
    assert classes == WNIDS and meta["names"] == NAMES

    images = sorted((named_tree / "val").rglob("*.JPEG"))[:3]
    code, out, _ = _predict(capsys, str(model), *map(str, images), "--topk", "5")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for image, line in zip(images, lines):
        assert line.startswith(f"{image}  ")
        entries = _entries(line)
        # Every class once (top 5 of 5), each with its own name ("crane" twice, one class unnamed).
        assert sorted(e[0] for e in entries) == WNIDS
        assert {e[0]: e[1] for e in entries} == dict(zip(WNIDS, SHORT))
        assert sum(e[2] for e in entries) == pytest.approx(1, abs=5e-4)

    code, out, _ = _predict(capsys, str(model), str(images[0]), "--topk", "5", "--json")
    (result,) = json.loads(out)
    assert {t["class"]: t["name"] for t in result["topk"]} == dict(zip(WNIDS, SHORT))


def test_an_export_without_names_predicts_as_before(named_tree, tmp_path, capsys):
    from trainer.artifacts.pretrained import load_pretrained

    model = _export(tmp_path / "old.pt", None)
    assert load_pretrained(model).names is None
    image = sorted((named_tree / "val").rglob("*.JPEG"))[0]
    code, out, _ = _predict(capsys, str(model), str(image), "--topk", "2")
    assert code == 0
    assert re.fullmatch(rf"{re.escape(str(image))}  n0000000\d \d\.\d{{4}}  n0000000\d \d\.\d{{4}}", out.strip()), out
    code, out, _ = _predict(capsys, str(model), str(image), "--topk", "2", "--json")
    assert [t["name"] for t in json.loads(out)[0]["topk"]] == [None, None]


def test_a_sidecar_with_bad_names_is_named(tmp_path):
    from trainer.artifacts.export import sidecar_path
    from trainer.artifacts.pretrained import load_pretrained

    model = _export(tmp_path / "bad.pt", NAMES[:3])
    with pytest.raises(ValueError, match=re.escape(f"{sidecar_path(model)}: 'names' must be a list of 5 strings")):
        load_pretrained(model)


# --- a fit: checkpoints, load_pretrained, predict, W&B ----------------------------------------------


def _fit(root: Path, run_dir: Path, *more: str) -> dict:
    from trainer.config import load_config
    from trainer.run import fit

    return fit(load_config([
        "experiment=smoke", f"data.root={root}", f"run.dir={run_dir}", "data.batch_size=8", "data.filelist_cache=false",
        "trainer.log_every_n_steps=2", "logger.wandb.mode=offline", *more,
    ]))


@pytest.mark.slow
def test_names_travel_from_the_data_into_checkpoints_predict_and_wandb(named_tree, tmp_path, capsys, monkeypatch):
    from tests.test_tracking import config_of, history, inspect, offline_runs, wandb_images
    from trainer.artifacts.export import export_checkpoint, sidecar_path
    from trainer.artifacts.pretrained import load_pretrained
    from trainer.run import validate_checkpoint

    for var in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    run_dir = tmp_path / "run"
    _fit(named_tree, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["classes"] == WNIDS and ckpt["hyper_parameters"]["names"] == NAMES
    assert load_pretrained(last).names == NAMES

    # predict, as a user runs it, on the checkpoint.
    image = sorted((named_tree / "val" / "n00000001").iterdir())[0]
    code, out, _ = _predict(capsys, str(last), str(image), "--topk", "5")
    assert code == 0
    assert {e[0]: e[1] for e in _entries(out.strip())} == dict(zip(WNIDS, SHORT))

    # An export's sidecar carries them (written here when export does not add them itself).
    exported = export_checkpoint(last, tmp_path / "model.pt")
    side = json.loads(sidecar_path(exported["path"]).read_text())
    side["names"] = ckpt["hyper_parameters"]["names"]
    sidecar_path(exported["path"]).write_text(json.dumps(side))
    assert load_pretrained(exported["path"]).names == NAMES

    # W&B: the sample grid's images are captioned with their classes' names; the names are not config.
    (run,) = offline_runs(run_dir)
    records = inspect(run)
    config = config_of(records)
    assert "names" not in config and "classes" not in config and config["model"]["arch"] == "resnet20"
    (row,) = [r for r in history(records) if wandb_images(r)]
    captions = row["samples.captions"]
    assert len(captions) == row["samples.count"] == 32
    labelled = [f"{s} ({w})" if s else w for w, s in zip(WNIDS, SHORT)]
    assert set(captions) <= set(labelled) and len(set(captions)) >= 3, captions

    # A checkpoint from before names: loads, predicts as before, validates on the named data.
    del ckpt["hyper_parameters"]["names"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    assert load_pretrained(old).names is None
    code, out, _ = _predict(capsys, str(old), str(image), "--topk", "1")
    assert code == 0 and re.fullmatch(rf"{re.escape(str(image))}  n0000000\d \d\.\d{{4}}", out.strip()), out
    result = validate_checkpoint(old, ["logger.wandb.mode=disabled"])
    assert result["images"] == 10

    # New names in the data: a resume is no error (names are for people), and keeps the new ones.
    (named_tree / NAMES_FILE).write_text(SYNSET_WORDS.replace("tench, Tinca tinca", "tinca"))
    try:
        _fit(named_tree, run_dir, "trainer.max_epochs=2", "run.allow_resume_change=true", "logger.wandb.mode=disabled")
        resumed = torch.load(last, map_location="cpu", weights_only=True)
        assert resumed["epoch"] == 1 and resumed["hyper_parameters"]["names"] == ["tinca", *NAMES[1:]]
    finally:
        (named_tree / NAMES_FILE).write_text(SYNSET_WORDS)


def test_a_mixed_training_image_is_captioned_with_both_classes():
    from trainer.callbacks import label_caption
    from trainer.recipe.mixing import build_mixing

    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    _, targets = build_mixing(5, mixup_alpha=0.4)(torch.rand(6, 3, 8, 8), labels)
    for label, target in zip(labels.tolist(), targets):
        caption = label_caption(target, WNIDS, NAMES)
        own = f"{SHORT[label]} ({WNIDS[label]})" if SHORT[label] else WNIDS[label]
        if target.max() == 1:  # mixed with an image of its own class: one class, no shares
            assert caption == own
            continue
        parts = [re.fullmatch(r"(.+) (\d\.\d\d)", p).groups() for p in caption.split(" + ")]
        shares = [float(share) for _, share in parts]
        assert len(parts) == 2 and shares == sorted(shares, reverse=True), caption
        assert sum(shares) == pytest.approx(1, abs=0.011) and own in [text for text, _ in parts], caption
    assert label_caption(torch.tensor(1), WNIDS, NAMES) == "great white shark (n00000001)"
    assert label_caption(torch.tensor(4), WNIDS, NAMES) == "n00000004"  # unnamed: the wnid alone
    assert label_caption(torch.tensor(2), WNIDS, None) == "n00000002"  # a model without names
