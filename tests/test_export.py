"""`imagenet-trainer export` and `trainer.load_pretrained`: a checkpoint trained here, exported in
every format, loads into plain torchvision / safetensors / onnxruntime with the module's logits."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from tests.conftest import CPU_FIT, run_cli
from trainer.artifacts.export import SUFFIXES, export_checkpoint, plain_state_dict, sidecar_path
from trainer.recipe.models import build_model
from trainer.module import Classifier
from trainer.run import build_module, load_checkpoint_config
from trainer.recipe.specs import OptimSpec


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory) -> Path:
    """A resnet18 (torchvision's architecture) trained one epoch on the tiny tree: its last.ckpt."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    proc = run_cli("fit", *CPU_FIT, "model.arch=resnet18", f"data.root={tiny_root}", f"run.dir={run_dir}",
                   "data.batch_size=16", "logger.wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def module(trained) -> Classifier:
    """The trained LightningModule itself, rebuilt from the checkpoint as `validate` does."""
    cfg, ckpt = load_checkpoint_config(trained, [])
    m = build_module(cfg, ckpt["hyper_parameters"]["classes"])
    m.load_state_dict(ckpt["state_dict"])
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    """The checkpoint exported once in each format: torchvision through the CLI, the others in-process."""
    folder = tmp_path_factory.mktemp("exported")
    out = {"torchvision": folder / "rn18.pt"}
    proc = run_cli("export", str(trained), "--format", "torchvision", "--out", str(out["torchvision"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out["torchvision"]) in proc.stdout
    for fmt, name in (("safetensors", "rn18.safetensors"), ("onnx", "rn18.onnx")):
        out[fmt] = Path(export_checkpoint(trained, folder / name, fmt)["path"])
    return out


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assemble_checkpoint(path: Path, arch: str, classes: list[str], names: list[str] | None = None, *,
                        overrides: tuple[str, ...] = (), global_step: int = 8, seed: int = 0) -> Classifier:
    """A Lightning checkpoint at ``path`` as a fit writes it (the Classifier's state_dict and
    hyper_parameters, epoch, global_step), without training: its Classifier, in eval mode. The
    BatchNorm running statistics are made non-trivial, so that eval-mode BN shows in the logits;
    ``names`` go into the hyper_parameters as the fit puts them there."""
    from trainer.config import load_config

    torch.manual_seed(seed)
    cfg = load_config(["experiment=smoke", f"model.arch={arch}", "data.root=/nonexistent", *overrides])
    module = build_module(cfg, classes, load_init_from=False)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    hp = dict(module.hparams)
    hp["names"] = names
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp, "epoch": 0,
                "global_step": global_step}, path)
    return module.eval()


@pytest.mark.slow
def test_torchvision_export_loads_strictly_into_torchvision_resnet18(exported, module, images, tiny_root):
    out = exported["torchvision"]
    net = torchvision.models.resnet18(num_classes=4)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    torch.testing.assert_close(logits(net.eval(), images), logits(module, images), atol=1e-5, rtol=0)

    meta = json.loads(sidecar_path(out).read_text())
    wnids = sorted(p.name for p in (tiny_root / "train").iterdir())
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 4 and meta["classes"] == wnids
    assert meta["preprocessing"]["resize"] == 36 and meta["preprocessing"]["crop"] == 32
    assert meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["preprocessing"]["std"] == [0.229, 0.224, 0.225]
    assert meta["torchvision_builder"] == "torchvision.models.resnet18"


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_every_torchvision_depth_accepts_the_exported_state_dict(depth):
    arch = f"resnet{depth}"
    classifier = Classifier(build_model(arch, 7), num_classes=7, batch_size=8, optim=OptimSpec(lr=0.1, momentum=0.9))
    sd = plain_state_dict(classifier.state_dict())
    getattr(torchvision.models, arch)(num_classes=7).load_state_dict(sd, strict=True)


@pytest.mark.slow
def test_safetensors_export_loads_with_safetensors_and_matches(exported, module, images):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = exported["safetensors"]
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["format"] == "safetensors"
    net = torchvision.models.resnet18(num_classes=4)
    net.load_state_dict(load_file(str(out)), strict=True)
    torch.testing.assert_close(logits(net.eval(), images), logits(module, images), atol=1e-5, rtol=0)
    with safe_open(str(out), framework="pt") as f:  # the metadata travels inside the file too
        assert json.loads(f.metadata()["imagenet_trainer"])["classes"] == meta["classes"]


@pytest.mark.slow
def test_onnx_export_has_a_dynamic_batch_and_matches_in_onnxruntime(exported, module):
    import onnx
    import onnxruntime as ort

    out = exported["onnx"]
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["input"]["name"] == "images" and meta["output"]["name"] == "logits"
    graph_input = onnx.load(str(out)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(["logits"], {"images": x.numpy()})
        np.testing.assert_allclose(got, logits(module, x).numpy(), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_load_pretrained_reads_every_source_alike(trained, exported, module, images):
    import trainer

    exports = [trained, *exported.values()]
    expected = logits(module, images)
    for path in exports:
        model, preprocess, classes, meta = trainer.load_pretrained(path)
        assert not model.training, path
        assert classes == module.hparams.classes and meta["arch"] == "resnet18"
        torch.testing.assert_close(logits(model, images), expected, atol=1e-4, rtol=0)
        from PIL import Image

        assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


@pytest.mark.slow
def test_load_pretrained_never_unpickles_code(exported, tmp_path):
    from trainer.artifacts.pretrained import load_pretrained

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    bad = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload()}, bad)
    shutil.copy(sidecar_path(exported["torchvision"]), sidecar_path(bad))
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(bad)
    assert not marker.exists()

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"config": {}}, "x": Payload()}, ckpt)
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(ckpt)
    assert not marker.exists()


@pytest.mark.slow
def test_export_without_sidecar_or_of_a_missing_file_says_what_to_do(exported, tmp_path, capsys):
    from trainer.cli import main
    from trainer.artifacts.pretrained import load_pretrained

    out = tmp_path / "m.pt"
    shutil.copy(exported["torchvision"], out)  # without its sidecar
    with pytest.raises(ValueError, match=r"m\.pt\.json"):
        load_pretrained(out)
    with pytest.raises(FileNotFoundError, match="wandb:ent/proj/model-x:best"):
        load_pretrained("ent/proj/model-x:best")
    assert main(["export", str(tmp_path / "nope.ckpt"), "--format", "onnx"]) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_load_pretrained_from_a_wandb_artifact_reference(trained, tmp_path, monkeypatch):
    """The artifact a W&B run logs holds `model.ckpt`. The server is replaced by a stand-in that
    serves this checkpoint: what is tested is resolving the reference and loading what arrives."""
    import wandb

    from trainer.artifacts.pretrained import load_pretrained

    asked = {}

    class Artifact:
        def download(self, root):
            Path(root).mkdir(parents=True, exist_ok=True)
            shutil.copy(trained, Path(root) / "model.ckpt")
            return root

    class Api:
        def artifact(self, ref, type=None):
            asked.update(ref=ref, type=type)
            return Artifact()

    monkeypatch.setattr(wandb, "Api", Api)
    result = load_pretrained("wandb:ent/proj/model-abc123:best", download_root=tmp_path / "dl")
    assert asked == {"ref": "ent/proj/model-abc123:best", "type": "model"}
    assert result.meta["artifact"] == "ent/proj/model-abc123:best" and result.meta["arch"] == "resnet18"
    assert (tmp_path / "dl" / "model.ckpt").is_file()


NAMES = ["tench, Tinca tinca", "", "goldfish, Carassius auratus"]
WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors", pytest.param("onnx", marks=pytest.mark.slow)])
def test_every_format_carries_the_class_names_in_its_sidecar(tmp_path, fmt):
    """The sidecar's ``names``: each class's words aligned with ``classes`` ("" for an unnamed
    class); load_pretrained hands them back. (hf: tests/test_export_hf.py.)"""
    from trainer.artifacts.pretrained import load_pretrained

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assemble_checkpoint(ckpt, "resnet20", WNIDS, NAMES)
    out = tmp_path / f"m{SUFFIXES[fmt]}"
    result = export_checkpoint(ckpt, out, fmt)
    side = json.loads(Path(result["sidecar"]).read_text())
    assert side["classes"] == WNIDS and side["names"] == NAMES
    assert load_pretrained(out).meta["names"] == NAMES


def test_a_checkpoint_without_names_exports_null_names(tmp_path):
    """A checkpoint of data without names (or from before names): ``names`` is null, not missing."""
    ckpt = tmp_path / "last.ckpt"
    assemble_checkpoint(ckpt, "resnet20", WNIDS, None)
    side = json.loads(Path(export_checkpoint(ckpt, tmp_path / "m.safetensors", "safetensors")["sidecar"]).read_text())
    assert "names" in side and side["names"] is None and side["classes"] == WNIDS


def test_names_that_do_not_match_the_classes_are_refused_naming_the_checkpoint(tmp_path):
    ckpt = tmp_path / "bad.ckpt"
    assemble_checkpoint(ckpt, "resnet20", WNIDS, NAMES[:2])
    with pytest.raises(ValueError, match=r"bad\.ckpt: hyper_parameters\['names'\] must be a list of 3 strings"):
        export_checkpoint(ckpt, tmp_path / "m.pt", "torchvision")
    assert not (tmp_path / "m.pt").exists()
