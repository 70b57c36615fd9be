"""The EMA of the weights (ema.decay): the reference update over parameters and BatchNorm
statistics, validated as val_ema/* in a real fit, saved in the checkpoint and continued on resume,
and chosen with --weights by export, validate and load_pretrained."""
from __future__ import annotations

import copy
import csv
import json
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from tests.conftest import run_cli
from trainer.config import ConfigError, load_config
from trainer.recipe.ema import EMA
from trainer.artifacts.export import EMA_KEY, export_checkpoint, plain_state_dict, sidecar_path
from trainer.artifacts.pretrained import load_pretrained
from trainer.run import build_datamodule, build_module, build_trainer, fit, validate_checkpoint

DECAY = 0.9  # far from 1: a few steps move the average well away from both ends


# --- the update rule -------------------------------------------------------------------------------


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_step(net: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One optimiser step in train mode: moves the parameters and the BatchNorm statistics."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("every", [1, 2])
def test_ema_is_the_reference_update_of_parameters_and_buffers_every_n_steps(every):
    net = _toy()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    cb = EMA(DECAY, every_n_steps=every)
    module = SimpleNamespace(model=net)
    cb.on_fit_start(None, module)
    # The reference: ema = d * ema + (1 - d) * w for every float tensor of the state_dict, starting
    # from the weights the fit starts with; the integer batch counter is copied.
    ref = {k: v.clone().double() for k, v in net.state_dict().items()}
    updated = []
    for step in range(1, 6):
        _train_step(net, opt, seed=step)
        for _ in range(2):  # a second call at the same global step (a batch that only accumulates)
            cb.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
        if step % every == 0:
            updated.append(step)
            for k, v in net.state_dict().items():
                ref[k] = DECAY * ref[k] + (1 - DECAY) * v.double() if v.is_floating_point() else v.clone().double()
    assert updated == ([1, 2, 3, 4, 5] if every == 1 else [2, 4])
    assert cb.last_step == updated[-1]
    got = cb.module.state_dict()
    assert set(got) == set(ref)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(got)  # buffers too
    for k, v in got.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
        torch.testing.assert_close(v.double(), ref[k], rtol=0, atol=1e-6, msg=k)
    # ...and it is an average, not the weights: they have moved on.
    assert not torch.allclose(got["0.weight"], net.state_dict()["0.weight"])
    assert cb.module.training is False and not any(p.requires_grad for p in cb.module.parameters())


def test_ema_is_float32_for_a_bfloat16_network():
    net = _toy().to(torch.bfloat16)
    cb = EMA(0.9999)
    cb.on_fit_start(None, SimpleNamespace(model=net))
    before = cb.module.state_dict()["0.weight"].clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    cb.on_train_batch_end(SimpleNamespace(global_step=1), SimpleNamespace(model=net), None, None, 0)
    after = cb.module.state_dict()["0.weight"]
    assert after.dtype == torch.float32
    # 1e-4 of the step: lost in bfloat16 (8 bits of mantissa), kept in float32.
    torch.testing.assert_close(after - before, torch.full_like(before, 1e-4), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("override, words", [
    ("ema.decay=1.5", ["ema.decay=1.5", "between 0 and 1"]),
    ("ema.decay=0", ["ema.decay=0"]),
    ("ema.every_n_steps=0", ["ema.every_n_steps=0"]),
])
def test_bad_ema_values_fail_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(["data.root=/x", override])
    for word in words:
        assert word in str(info.value)


# --- a real fit ------------------------------------------------------------------------------------


def _overrides(run_dir, *more):
    # One fixed random batch (backend=synthetic): the run is deterministic, so an interrupted and
    # resumed run must end where an uninterrupted one does.
    return ["data.backend=synthetic", "model.arch=resnet20", "model.num_classes=4", "data.synthetic_size=32",
            "data.batch_size=4", "data.image_size=32", "data.val_resize=32", "trainer.accelerator=cpu",
            "trainer.max_epochs=1", "trainer.limit_val_batches=2", "logger.wandb.mode=disabled",
            "optim.warmup_epochs=0", f"ema.decay={DECAY}", f"run.dir={run_dir}", *more]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A finished 1-epoch fit with ema.decay (8 steps); its run directory and summary."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    summary = fit(load_config(_overrides(run_dir)))
    return run_dir, summary


def test_fit_validates_the_ema_beside_the_raw_model_and_checkpoints_it(ema_run):
    run_dir, summary = ema_run
    for key in ("val_ema/top1", "val_ema/top5", "val_ema/loss", "val/top1"):
        assert key in summary, summary
    assert 0 <= summary["val_ema/top1"] <= summary["val_ema/top5"] <= 1
    assert summary["val_ema/loss"] != summary["val/loss"]  # two sets of weights, two results
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("val_ema/top1") for row in rows)  # logged each epoch, beside val/top1
    for name in ("last.ckpt", "best-epoch000.ckpt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        state = ckpt["callbacks"][EMA_KEY]
        assert state["last_step"] == 8 and state["decay"] == DECAY
        ema, raw = state["state_dict"], plain_state_dict(ckpt["state_dict"])
        assert set(ema) == set(raw)  # the network's own key names
        assert all(v.dtype == torch.float32 for v in ema.values() if v.is_floating_point())
        assert not torch.equal(ema["conv1.weight"], raw["conv1.weight"])
        assert not torch.equal(ema["bn1.running_mean"], raw["bn1.running_mean"])


class _Interrupt(Exception):
    pass


class _StopAt(pl.Callback):
    """A checkpoint at the start of batch ``batch`` of epoch ``epoch``, as a preemption writes it
    (trainer/cluster/preemption.py), then a stop."""

    def __init__(self, epoch, batch, path):
        self.at, self.path = (epoch, batch), path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.at:
            trainer.save_checkpoint(self.path)
            raise _Interrupt


class _EmaAtStart(pl.Callback):
    """The EMA callback's average when the fit starts (after it restored a checkpoint's)."""

    def on_fit_start(self, trainer, pl_module):
        [cb] = [c for c in trainer.callbacks if isinstance(c, EMA)]
        self.state = copy.deepcopy(cb.module.state_dict())


def _ema_of(trainer) -> dict:
    [cb] = [c for c in trainer.callbacks if isinstance(c, EMA)]
    return cb.module.state_dict()


def _run(cfg, run_dir, extra=(), ckpt_path=None):
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.classes)
    trainer = build_trainer(cfg, run_dir, for_fit=True)
    trainer.callbacks.extend(extra)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except _Interrupt:
        pass
    return trainer


@pytest.mark.slow
def test_resume_restores_the_ema_and_ends_where_an_uninterrupted_run_does(tmp_path):
    cfg = load_config(_overrides(tmp_path / "full", "trainer.max_epochs=2"))
    full = _ema_of(_run(cfg, tmp_path / "full"))

    ckpt = tmp_path / "hpc_ckpt_1.ckpt"
    cfg = load_config(_overrides(tmp_path / "parts", "trainer.max_epochs=2"))
    _run(cfg, tmp_path / "parts", [_StopAt(1, 3, ckpt)])  # mid-epoch 1: 8 + 3 steps done
    saved = torch.load(ckpt, weights_only=True)["callbacks"][EMA_KEY]
    assert saved["last_step"] == 11
    at_start = _EmaAtStart()
    resumed = _run(cfg, tmp_path / "parts", [at_start], ckpt_path=str(ckpt))
    assert resumed.global_step == 16
    for k, v in saved["state_dict"].items():  # restored as saved, on every key
        assert torch.equal(at_start.state[k], v), k
    for k, v in _ema_of(resumed).items():  # and continued as if never interrupted
        torch.testing.assert_close(v, full[k], rtol=1e-5, atol=1e-6, msg=k)


# --- --weights ema|raw -----------------------------------------------------------------------------


def test_validate_takes_the_ema_by_default_and_either_on_request(ema_run):
    run_dir, summary = ema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ema = validate_checkpoint(ckpt, [], weights="ema")
    raw = validate_checkpoint(ckpt, [], weights="raw")
    default = validate_checkpoint(ckpt, [])
    assert (ema["weights"], raw["weights"], default["weights"]) == ("ema", "raw", "ema")
    assert ema["loss"] != raw["loss"]
    assert default["loss"] == pytest.approx(ema["loss"], abs=1e-6)
    # The same numbers the fit logged for its last epoch (same synthetic val batches).
    assert ema["loss"] == pytest.approx(summary["val_ema/loss"], rel=1e-4)
    assert raw["loss"] == pytest.approx(summary["val/loss"], rel=1e-4)


@pytest.mark.slow
def test_export_and_load_pretrained_choose_the_weights(ema_run, tmp_path):
    run_dir, _ = ema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    ema, raw = saved["callbacks"][EMA_KEY]["state_dict"], plain_state_dict(saved["state_dict"])

    proc = run_cli("export", str(ckpt), "--out", str(tmp_path / "default.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ema weights" in proc.stdout
    proc = run_cli("export", str(ckpt), "--weights", "raw", "--out", str(tmp_path / "raw.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    default_sd = torch.load(tmp_path / "default.pt", weights_only=True)
    raw_sd = torch.load(tmp_path / "raw.pt", weights_only=True)
    for k in ema:
        assert torch.equal(default_sd[k], ema[k]) and torch.equal(raw_sd[k], raw[k]), k
    assert json.loads(sidecar_path(tmp_path / "default.pt").read_text())["weights"] == "ema"
    assert json.loads(sidecar_path(tmp_path / "raw.pt").read_text())["weights"] == "raw"

    for weights, expected in ((None, ema), ("ema", ema), ("raw", raw)):
        model = load_pretrained(ckpt, weights=weights).model
        assert torch.equal(model.state_dict()["conv1.weight"], expected["conv1.weight"]), weights
    # An export holds one set of weights: the other one is asked for from the checkpoint.
    with pytest.raises(ValueError, match="holds the raw weights.*--weights ema"):
        load_pretrained(tmp_path / "raw.pt", weights="ema")
    meta = export_checkpoint(ckpt, tmp_path / "ema.safetensors", "safetensors", weights="ema")
    assert meta["weights"] == "ema" and load_pretrained(tmp_path / "ema.safetensors").meta["weights"] == "ema"


@pytest.mark.slow
def test_asking_for_the_ema_of_a_checkpoint_without_one_is_a_clear_error(ema_run, tmp_path):
    run_dir, _ = ema_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["callbacks"][EMA_KEY]
    plain = tmp_path / "plain.ckpt"
    torch.save(ckpt, plain)
    assert validate_checkpoint(plain, [])["weights"] == "raw"  # the default follows what it holds
    with pytest.raises(ValueError, match="holds no EMA weights.*--weights raw"):
        export_checkpoint(plain, tmp_path / "x.pt", weights="ema")
    with pytest.raises(ValueError, match="holds no EMA weights"):
        load_pretrained(plain, weights="ema")
    proc = run_cli("validate", str(plain), "--weights", "ema", "--json", str(tmp_path / "v.json"))
    assert proc.returncode == 2 and "holds no EMA weights" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_fit_validates_and_checkpoints_the_ema(tiny_root, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = run_cli("fit", "experiment=smoke", "data.backend=torchvision", "data.num_workers=0",
                   "trainer.accelerator=cpu", f"data.root={tiny_root}", f"run.dir={run_dir}", "trainer.devices=2",
                   "data.batch_size=8", "trainer.max_epochs=1", "logger.wandb.mode=disabled", "ema.decay=0.9")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and 0 <= summary["val_ema/top1"] <= 1
    assert "EMA weights: val top-1" in proc.stdout
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"][EMA_KEY]["last_step"] == summary["global_step"] == 4
