"""`imagenet-trainer export --format hf`: a folder that timm loads with ``local-dir:`` and gives our
logits on real JPEGs preprocessed as its config.json says; the config's fields; a model card
that shows only results measured on the exported weights; the architectures timm lacks refused."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import CPU_FIT
from tests.test_export import NAMES, WNIDS, assemble_checkpoint
from trainer.artifacts.export import export_hf, timm_crop_pct


def _val_jpegs(root: Path) -> list[Path]:
    return sorted((root / "val").rglob("*.JPEG"))[:6]


@pytest.fixture(scope="module", params=["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory):
    """(checkpoint, its Classifier, the hf folder) for a 3-class resnet18 / resnet50 at 32 px
    (val_resize 36), whose second class has no name."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"hf_{arch}")
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    module = assemble_checkpoint(ckpt, arch, WNIDS, NAMES)
    out = Path(export_hf(ckpt, root / f"{arch}-hf")["path"])
    return ckpt, module, out


def test_timm_loads_the_folder_and_gives_our_logits_on_real_images(exported, tiny_root):
    import timm
    from PIL import Image

    from trainer.artifacts.pretrained import load_pretrained

    ckpt, module, out = exported
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    ours = load_pretrained(ckpt).preprocess
    images = [Image.open(p).convert("RGB") for p in _val_jpegs(tiny_root)]  # 40x32: the resize matters
    x_timm = torch.stack([transform(im) for im in images])
    x_ours = torch.stack([ours(im) for im in images])
    torch.testing.assert_close(x_timm, x_ours, atol=0, rtol=0)  # the same pixels, resize to crop
    with torch.no_grad():
        torch.testing.assert_close(model(x_timm), module.model(x_ours), atol=1e-5, rtol=0)
    assert model.pretrained_cfg["label_names"] == WNIDS


def test_timm_resnet_has_torchvisions_key_names_and_shapes(exported):
    """What lets a torchvision state_dict go into timm's resnet unchanged (checked strictly)."""
    import timm
    from safetensors.torch import load_file

    _, _, out = exported
    arch = json.loads((out / "config.json").read_text())["architecture"]
    fresh = timm.create_model(arch, pretrained=False, num_classes=3).state_dict()
    saved = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in fresh.items()}


def test_config_json_has_timms_fields(exported):
    _, module, out = exported
    config = json.loads((out / "config.json").read_text())
    arch = module.hparams.config["model"]["arch"]
    assert config["architecture"] == arch and config["num_classes"] == 3
    assert config["num_features"] == module.model.fc.in_features == (512 if arch == "resnet18" else 2048)
    assert config["label_names"] == WNIDS
    # Only the named classes are described; wnids stay the keys.
    assert config["label_descriptions"] == {"n01440764": "tench, Tinca tinca",
                                            "n01484850": "goldfish, Carassius auratus"}
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["interpolation"] == "bilinear"
    assert math.floor(32 / cfg["crop_pct"]) == 36 and cfg["crop_pct"] == pytest.approx(32 / 36)
    assert cfg["mean"] == [0.485, 0.456, 0.406] and cfg["std"] == [0.229, 0.224, 0.225]
    assert cfg["first_conv"] == "conv1" and cfg["classifier"] == "fc" and cfg["num_classes"] == 3
    assert "license" not in cfg  # none given: none claimed


@pytest.mark.parametrize("crop, resize", [(224, 256), (32, 36), (17, 25), (18, 28), (176, 232)])
def test_crop_pct_reads_back_as_our_resize_in_timms_transform(crop, resize):
    """timm resizes to floor(crop / crop_pct); a plain crop / resize gives 24 for (17, 25)."""
    import timm

    transform = timm.data.create_transform(input_size=(3, crop, crop), crop_pct=timm_crop_pct(resize, crop),
                                           interpolation="bilinear")
    assert transform.transforms[0].size == resize
    assert transform.transforms[1].size == (crop, crop)


@pytest.mark.parametrize("exported", ["resnet18"], indirect=True)
def test_load_pretrained_reads_the_folders_weights_through_their_sidecar(exported):
    from trainer.artifacts.pretrained import load_pretrained

    ckpt, module, out = exported
    loaded = load_pretrained(out / "model.safetensors")
    assert loaded.classes == WNIDS and loaded.meta["names"] == NAMES and loaded.meta["format"] == "hf"
    assert load_pretrained(out).meta == loaded.meta  # the folder itself, as a user passes it
    side = json.loads((out / "model.safetensors.json").read_text())
    assert side["names"] == NAMES and side["timm_architecture"] == module.hparams.config["model"]["arch"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), module.model(x), atol=1e-5, rtol=0)


# --- the model card ---------------------------------------------------------------------------------

def _front_matter(card: str) -> dict[str, str]:
    head = card.split("---\n")[1]
    return dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)


def _results_numbers(card: str) -> set[str]:
    """Every number written in the card's Results section (not the 1 of "top-1")."""
    section = card.split("## Results\n")[1].split("\n## ")[0]
    return set(re.findall(r"(?<![\w.-])[-+]?\d+(?:\.\d+)?", section))


@pytest.fixture
def resnet18_ckpt(tmp_path) -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assemble_checkpoint(ckpt, "resnet18", WNIDS, NAMES)
    return ckpt


def _summary(run_dir: Path, **changes) -> None:
    summary = {"val/top1": 0.4321, "val/top5": 0.8765, "val/images": 20, "val/loss": 1.2345, "epochs": 1,
               "global_step": 8, "best_ckpt": str(run_dir / "checkpoints" / "best-epoch000.ckpt"),
               "best/val/top1": 0.4321, "last_ckpt": str(run_dir / "checkpoints" / "last.ckpt"), **changes}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_card_without_a_recorded_result_says_so_and_shows_no_number(resnet18_ckpt, tmp_path):
    out = Path(export_hf(resnet18_ckpt, tmp_path / "card-hf")["path"])
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "timm" and front["pipeline_tag"] == "image-classification"
    assert "license" not in front
    assert "No result was recorded for this checkpoint" in card
    assert _results_numbers(card) == set()
    assert "- **Optimiser:** sgd, lr 0.8 per 256 images, momentum 0.9, weight decay 0.0001" in card
    assert "- **Experiment:** smoke" in card and "- **Batch size:** 16 per device" in card


def test_card_shows_the_runs_measured_results_of_this_checkpoint_only(resnet18_ckpt, tmp_path):
    run_dir = resnet18_ckpt.parent.parent
    _summary(run_dir)
    result = export_hf(resnet18_ckpt, tmp_path / "a-hf", license="apache-2.0")
    card = (tmp_path / "a-hf" / "README.md").read_text()
    assert _front_matter(card)["license"] == "apache-2.0"
    assert json.loads((tmp_path / "a-hf" / "config.json").read_text())["pretrained_cfg"]["license"] == "apache-2.0"
    assert "| val | 20 | 43.21 | 87.65 | summary.json (the fit's last validation) |" in card
    assert _results_numbers(card) == {"20", "43.21", "87.65"}  # the loss, step, epochs are not results
    assert [r["top1"] for r in result["results"]] == [0.4321]

    # The same run after it trained on: summary.json measured a later last.ckpt, not this one.
    _summary(run_dir, global_step=16, **{"val/top1": 0.5})
    result = export_hf(resnet18_ckpt, tmp_path / "b-hf")
    card = (tmp_path / "b-hf" / "README.md").read_text()
    assert "No result was recorded" in card and _results_numbers(card) == set()
    assert any("summary.json measured another checkpoint" in n for n in result["notes"])

    # A run that validated every 2nd epoch and stopped after an odd one: its last val is older.
    odd = tmp_path / "odd" / "checkpoints" / "last.ckpt"
    assemble_checkpoint(odd, "resnet18", WNIDS, NAMES, overrides=("trainer.check_val_every_n_epoch=2",
                                                                   "trainer.max_epochs=3"))
    _summary(odd.parent.parent)
    card = (Path(export_hf(odd, tmp_path / "odd-hf")["path"]) / "README.md").read_text()
    assert "No result was recorded" in card and _results_numbers(card) == set()

    _summary(run_dir)
    (run_dir / "validate.json").write_text(json.dumps({"checkpoint": "elsewhere/last.ckpt", "top1": 0.4, "top5": 0.9,
                                                       "images": 20, "weights": "raw"}))
    card = (Path(export_hf(resnet18_ckpt, tmp_path / "c-hf")["path"]) / "README.md").read_text()
    assert "validate.json" in card and _results_numbers(card) == {"20", "43.21", "87.65", "40.00", "90.00"}


def test_an_ema_export_holds_the_ema_weights_and_shows_the_emas_results(tmp_path):
    """A run with ema.decay validates both sets: the card of the EMA export shows val_ema/*."""
    from safetensors.torch import load_file

    from trainer.artifacts.export import plain_state_dict

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = assemble_checkpoint(ckpt, "resnet18", WNIDS, NAMES)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in plain_state_dict(module.state_dict()).items()}
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["callbacks"] = {"EMA": {"state_dict": ema}}
    torch.save(checkpoint, ckpt)
    _summary(ckpt.parent.parent, **{"val_ema/top1": 0.5555, "val_ema/top5": 0.9375})

    result = export_hf(ckpt, tmp_path / "ema-hf")
    assert result["weights"] == "ema"
    torch.testing.assert_close(load_file(str(tmp_path / "ema-hf" / "model.safetensors")), ema, atol=0, rtol=0)
    card = (tmp_path / "ema-hf" / "README.md").read_text()
    assert "- **Weights:** ema" in card and _results_numbers(card) == {"20", "55.55", "93.75"}
    raw = (Path(export_hf(ckpt, tmp_path / "raw-hf", weights="raw")["path"]) / "README.md").read_text()
    assert _results_numbers(raw) == {"20", "43.21", "87.65"}


def test_card_shows_given_evaluate_results_and_refuses_another_checkpoints(resnet18_ckpt, tmp_path):
    given = tmp_path / "evaluate.json"  # the shape of `imagenet-trainer evaluate --json`
    given.write_text(json.dumps({"model": str(resnet18_ckpt), "weights": "raw", "temperature": None, "sets": [
        {"set": "v2", "kind": "v2", "images": 16, "top1": 0.3125, "top5": 0.75, "ece": 0.0512, "nll": 1.23456,
         "top1_diff": -0.125},
        {"set": "sketch", "kind": "sketch", "images": 8, "top1": 0.125, "top5": 0.5, "top1_diff": None}]}))
    card = (Path(export_hf(resnet18_ckpt, tmp_path / "e-hf", results=[given])["path"]) / "README.md").read_text()
    assert "| set | images | top-1 | top-5 | top-1 vs val | ECE | NLL | source |" in card
    assert "| v2 | 16 | 31.25 | 75.00 | -12.50 | 5.12 | 1.2346 | evaluate.json |" in card
    assert "| sketch | 8 | 12.50 | 50.00 |  |  |  | evaluate.json |" in card
    assert _results_numbers(card) == {"16", "31.25", "75.00", "-12.50", "5.12", "1.2346", "8", "12.50", "50.00"}

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "runs/x/checkpoints/best-epoch003.ckpt", "sets": [{"set": "val", "top1": 0.9}]}))
    with pytest.raises(ValueError, match=r"other\.json holds results of runs/x/checkpoints/best-epoch003\.ckpt"):
        export_hf(resnet18_ckpt, tmp_path / "o-hf", results=[other])
    assert not (tmp_path / "o-hf").exists()


# --- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, overrides, said", [
    ("plain18", (), "model.arch=plain18 is a plain net (no shortcuts)"),
    ("resnet20", (), "model.arch=resnet20 is a CIFAR-style ResNet"),
    ("resnet18", ("model.blurpool=true",), "model.arch=resnet18 was trained with model.blurpool=true"),
])
def test_an_arch_timm_lacks_is_refused_by_name_and_nothing_is_written(tmp_path, capsys, arch, overrides, said):
    from trainer.cli import main

    ckpt = tmp_path / "last.ckpt"
    assemble_checkpoint(ckpt, arch, WNIDS, None, overrides=overrides)
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagenet-trainer export: ") and said in err and "--format safetensors" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_an_existing_folder_with_other_files_is_refused_and_a_previous_export_replaced(resnet18_ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"--out .*mine exists and holds notes\.txt"):
        export_hf(resnet18_ckpt, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    again = tmp_path / "again"
    export_hf(resnet18_ckpt, again)
    export_hf(resnet18_ckpt, again, license="mit")
    assert sorted(p.name for p in again.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                       "model.safetensors.json"]
    assert "license: mit" in (again / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine", "run"]  # no temporary left


# --- from a real fit ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_fitted_run_exports_through_the_cli_with_its_summary_and_names(tiny_root, tmp_path):
    """A real (in-process) fit of a tree with synset_words.txt, then `export --format hf`: the card
    shows the summary.json numbers of that fit, config.json the names, and timm our logits."""
    import shutil

    import timm

    from trainer.cli import main
    from trainer.config import load_config
    from trainer.run import fit

    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    wnids = sorted(p.name for p in (root / "train").iterdir())
    (root / "synset_words.txt").write_text(f"{wnids[0]} tench, Tinca tinca\n{wnids[2]} crane\n")
    run_dir = tmp_path / "run"
    cfg = load_config([*CPU_FIT, "model.arch=resnet18", f"data.root={root}", f"run.dir={run_dir}",
                       "data.batch_size=16", "logger.wandb.mode=disabled"])
    summary = fit(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "rn18-hf"
    assert main(["export", str(ckpt), "--format", "hf", "--out", str(out)]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == wnids
    assert config["label_descriptions"] == {wnids[0]: "tench, Tinca tinca", wnids[2]: "crane"}
    card = (out / "README.md").read_text()
    top1, top5 = f"{100 * summary['val/top1']:.2f}", f"{100 * summary['val/top5']:.2f}"
    assert f"| val | {int(summary['val/images'])} | {top1} | {top5} | summary.json" in card
    assert _results_numbers(card) == {str(int(summary["val/images"])), top1, top5}

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    from trainer.artifacts.pretrained import load_pretrained

    ours = load_pretrained(ckpt)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ours.model(x), atol=1e-5, rtol=0)
