"""The speed-up recipes' choices: optimisers (sgd, lars, lamb, adamw), lr schedules (cosine, linear,
step, poly), losses (ce, bce; index or soft targets), gradient accumulation, and their config keys."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import CPU_FIT, run_cli
from trainer.config import ConfigError, load_config
from trainer.recipe.losses import LOSSES, build_loss
from trainer.module import Classifier, param_groups
from trainer.recipe.optim import OPTIMIZERS, build_optimizer
from trainer.run import build_module, fit, load_checkpoint_config, resume_changes
from trainer.recipe.schedules import SCHEDULES, schedule, warmup_cosine, warmup_linear, warmup_poly, warmup_step
from trainer.recipe.specs import LossSpec, OptimSpec, ScheduleSpec

# --- config keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("override", [
    *[f"optim.name={n}" for n in OPTIMIZERS],
    *[f"optim.schedule={s}" for s in SCHEDULES],
    *[f"loss.name={n}" for n in LOSSES],
    "model.blurpool=true", "model.sync_bn=true", "trainer.accumulate_grad_batches=4",
    "optim.betas=[0.9,0.95]", "optim.eps=1e-6", "optim.trust_coeff=0.02", "optim.milestones=[2,4.5]",
    "optim.gamma=0.5", "optim.poly_power=1.5",
])
def test_every_new_key_composes_and_validates(override):
    cfg = load_config(["data.root=/x", override])
    key = override.split("=")[0]
    assert OmegaConf.select(cfg, key) == OmegaConf.select(OmegaConf.from_dotlist([override]), key)


def test_the_defaults_are_todays_recipe():
    cfg = load_config(["data.root=/x"])
    assert cfg.optim.name == "sgd" and cfg.optim.schedule == "cosine" and cfg.loss.name == "ce"
    assert not cfg.model.blurpool and not cfg.model.sync_bn and cfg.trainer.accumulate_grad_batches == 1


@pytest.mark.parametrize("override, words", [
    ("optim.name=adam", ["optim.name", "sgd", "lars", "lamb", "adamw"]),
    ("optim.schedule=exponential", ["optim.schedule", "cosine", "linear", "step", "poly"]),
    ("loss.name=focal", ["loss.name", "ce", "bce"]),
    ("trainer.accumulate_grad_batches=0", ["trainer.accumulate_grad_batches", "positive"]),
    ("trainer.accumulate_grad_batches=1.5", ["trainer.accumulate_grad_batches"]),
    ("model.blurpool=maybe", ["model.blurpool"]),
    ("model.sync_bn=sometimes", ["model.sync_bn"]),
    ("optim.betas=[0.9]", ["optim.betas", "two numbers"]),
    ("optim.betas=[0.9,1.5]", ["optim.betas", "[0, 1)"]),
    ("optim.eps=0", ["optim.eps", "positive"]),
    ("optim.trust_coeff=-1", ["optim.trust_coeff", "positive"]),
    ("optim.milestones=[60,30]", ["optim.milestones", "ascending"]),
    ("optim.gamma=2", ["optim.gamma", "(0, 1]"]),
    ("optim.poly_power=0", ["optim.poly_power", "positive"]),
    ("optim.momentum=1.2", ["optim.momentum", "[0, 1)"]),
    ("optim.weight_decay=-1e-4", ["optim.weight_decay"]),
])
def test_bad_values_raise_naming_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(["data.root=/x", override])
    for word in words:
        assert word in str(info.value)


def test_nesterov_needs_a_momentum_optimiser():
    load_config(["data.root=/x", "optim.name=lars", "optim.nesterov=true"])
    with pytest.raises(ConfigError, match=r"optim\.nesterov=true needs optim\.name=sgd or lars"):
        load_config(["data.root=/x", "optim.name=adamw", "optim.nesterov=true"])


@pytest.mark.slow
def test_cli_exits_2_on_an_unknown_optimiser():
    proc = run_cli("print-config", "data.root=/x", "optim.name=adam", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.name" in proc.stderr and "lamb" in proc.stderr


# --- schedules ----------------------------------------------------------------------------------

WARM, TOTAL = 25, 400


def test_warmup_cosine_is_importable_from_the_module_as_before():
    from trainer import module
    from trainer.recipe import schedules

    assert module.warmup_cosine is schedules.warmup_cosine


def test_every_schedule_shares_the_warmup_and_is_one_at_its_end():
    for name in SCHEDULES:
        f = schedule(name, warmup_steps=WARM, total_steps=TOTAL, milestones=[200], gamma=0.1, power=2)
        assert [f(s) for s in range(WARM)] == pytest.approx([(s + 1) / WARM for s in range(WARM)]), name
        assert f(WARM - 1) == pytest.approx(1.0) and f(WARM) == pytest.approx(1.0), name
    with pytest.raises(ValueError, match="optim.schedule"):
        schedule("exp", warmup_steps=1, total_steps=2)


def test_cosine_matches_its_formula():
    for s in range(WARM, TOTAL + 20):
        t = min(1.0, (s - WARM) / (TOTAL - WARM))
        assert warmup_cosine(s, warmup_steps=WARM, total_steps=TOTAL) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)))
    assert warmup_cosine(TOTAL, warmup_steps=WARM, total_steps=TOTAL) == pytest.approx(0.0, abs=1e-12)


def test_linear_is_ffcvs_triangle_interpolated_per_iteration():
    """FFCV's get_linear_lr: np.interp(epoch, [0, peak_epoch, epochs], [1e-4, 1, 0]), per iteration."""
    steps_per_epoch, peak_epoch, epochs = 20, 2, 16
    warm, total = peak_epoch * steps_per_epoch, epochs * steps_per_epoch
    for s in range(total + 1):
        ffcv = np.interp(s / steps_per_epoch, [0, peak_epoch, epochs], [1e-4, 1.0, 0.0])
        ours = warmup_linear(s, warmup_steps=warm, total_steps=total)
        # The warmup reaches 1.0 one step earlier than FFCV's ramp; after the peak they agree.
        assert ours == pytest.approx(ffcv, abs=1.0 / warm if s < warm else 1e-12)
    assert warmup_linear(total, warmup_steps=warm, total_steps=total) == 0.0


def test_step_equals_torchs_multisteplr_after_the_warmup():
    milestones, gamma = [100, 200, 300], 0.1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[m - WARM for m in milestones], gamma=gamma)
    for s in range(WARM, TOTAL):
        assert warmup_step(s, warmup_steps=WARM, milestones=milestones, gamma=gamma) == pytest.approx(
            opt.param_groups[0]["lr"]), s
        opt.step()
        ref.step()
    assert warmup_step(99, warmup_steps=WARM, milestones=milestones, gamma=gamma) == 1.0
    assert warmup_step(100, warmup_steps=WARM, milestones=milestones, gamma=gamma) == pytest.approx(0.1)
    assert warmup_step(300, warmup_steps=WARM, milestones=milestones, gamma=gamma) == pytest.approx(1e-3)


def test_poly_equals_torchs_polynomiallr_after_the_warmup():
    power = 2.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=TOTAL - WARM, power=power)
    for s in range(WARM, TOTAL + 10):
        expected = (1 - min(1.0, (s - WARM) / (TOTAL - WARM))) ** power
        ours = warmup_poly(s, warmup_steps=WARM, total_steps=TOTAL, power=power)
        assert ours == pytest.approx(expected, abs=1e-12) and ours == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9)
        opt.step()
        ref.step()
    assert warmup_poly(TOTAL, warmup_steps=WARM, total_steps=TOTAL, power=power) == 0.0


class _Batches(torch.utils.data.Dataset):
    """40 images of 4 classes: with ``soft``, mixed targets [4] (two classes 70/30) as MixUp makes."""

    def __init__(self, soft: bool = False):
        self.soft = soft

    def __len__(self):
        return 40

    def __getitem__(self, i):
        x = torch.randn(3, 16, 16)
        if self.soft:
            return x, 0.7 * F.one_hot(torch.tensor(i % 4), 4).float() + 0.3 * F.one_hot(torch.tensor((i + 1) % 4), 4).float()
        return x, torch.tensor(i % 4)


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _fit_lrs(tmp_path, module, *, epochs, accumulate=1, soft=False):
    """The lr of every optimiser step of a small CPU fit (40 images, batch 8: 5 batches an epoch)."""
    seen = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, default_root_dir=tmp_path,
                         accumulate_grad_batches=accumulate, callbacks=[Record()], enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(soft), batch_size=8))
    return seen, trainer


def test_step_schedule_milestones_are_epochs_in_a_real_fit(tmp_path):
    module = Classifier(_tiny_net(), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.256, momentum=0.9),
                        schedule=ScheduleSpec(name="step", milestones=(1, 2), gamma=0.5))
    seen, _ = _fit_lrs(tmp_path, module, epochs=3)
    peak = 0.256 * 8 / 256
    assert seen == pytest.approx([peak] * 5 + [peak / 2] * 5 + [peak / 4] * 5)


def test_linear_schedule_in_a_real_fit_peaks_after_warmup_and_falls_to_zero(tmp_path):
    module = Classifier(_tiny_net(), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.256, momentum=0.9),
                        schedule=ScheduleSpec(name="linear", warmup_epochs=1))
    seen, _ = _fit_lrs(tmp_path, module, epochs=3)
    peak = 0.256 * 8 / 256
    assert seen[4] == pytest.approx(peak) and seen[5] == pytest.approx(peak)
    assert seen[-1] == pytest.approx(peak * 1 / 10)  # the last of 10 steps down to zero


def test_linear_schedule_peaks_at_peak_epoch_as_ffcvs_lr_peak_epoch(tmp_path):
    """optim.peak_epoch without a warmup is the same triangle as a warmup of that length."""
    by_peak = Classifier(_tiny_net(), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.256, momentum=0.9),
                         schedule=ScheduleSpec(name="linear", peak_epoch=1))
    by_warmup = Classifier(_tiny_net(), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.256, momentum=0.9),
                           schedule=ScheduleSpec(name="linear", warmup_epochs=1))
    seen, _ = _fit_lrs(tmp_path / "peak", by_peak, epochs=3)
    want, _ = _fit_lrs(tmp_path / "warmup", by_warmup, epochs=3)
    assert seen == pytest.approx(want) and max(seen) == pytest.approx(0.256 * 8 / 256)


@pytest.mark.parametrize("overrides, message", [
    (["optim.peak_epoch=2"], "is for optim.schedule=linear"),
    (["optim.schedule=linear", "optim.warmup_epochs=3", "optim.peak_epoch=2"], "before the end of optim.warmup_epochs"),
])
def test_peak_epoch_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["data.root=/x", *overrides])


# --- gradient accumulation ----------------------------------------------------------------------


@pytest.mark.slow
def test_accumulation_scales_the_lr_by_the_effective_batch(tmp_path):
    module = Classifier(_tiny_net(), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.256, momentum=0.9),
                        schedule=ScheduleSpec(name="step", milestones=(100,)))
    seen, trainer = _fit_lrs(tmp_path, module, epochs=2, accumulate=2)
    # 5 batches an epoch, a step every 2 and at the epoch's end: 3 steps an epoch.
    assert trainer.global_step == 6 and len(seen) == 6
    assert module.peak_lr() == pytest.approx(0.256 * 8 * 2 / 256)
    assert seen == pytest.approx([0.256 * 16 / 256] * 6)


def test_a_resume_with_other_accumulation_is_named_and_old_checkpoints_accumulated_nothing():
    ckpt = {"hyper_parameters": {"config": {"data": {"batch_size": 32}, "trainer": {"max_epochs": 90}}},
            "world_size": 8}
    assert resume_changes(ckpt, world_size=8, batch_size=32, max_epochs=90) == []
    assert resume_changes(ckpt, world_size=8, batch_size=32, max_epochs=90, accumulate=4) == [
        ("trainer.accumulate_grad_batches", 1, 4)]
    ckpt["hyper_parameters"]["config"]["trainer"]["accumulate_grad_batches"] = 4
    assert resume_changes(ckpt, world_size=8, batch_size=32, max_epochs=90, accumulate=4) == []


# --- optimisers ---------------------------------------------------------------------------------


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _batch(i: int):
    g = torch.Generator().manual_seed(i)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for i in range(n):
        x, y = _batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _adapted_groups(model: nn.Module, wd: float) -> list[dict]:
    decay, no_decay = param_groups(model, wd)
    return [{**decay, "always_adapt": True}, {**no_decay, "always_adapt": False}]


WD, LR = 1e-2, 0.05


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimiser_equals_its_reference_over_a_few_steps(name):
    from timm.optim import Lamb, Lars

    model, ref = _toy(), _toy()
    kwargs = dict(lr=LR, momentum=0.9, nesterov=name in ("sgd", "lars"), betas=(0.8, 0.99), eps=1e-7,
                  trust_coeff=0.02)
    impl = {"foreach": True} if name in ("sgd", "adamw") else {}
    opt = build_optimizer(OptimSpec(name=name, **kwargs), param_groups(model, WD), impl=impl)
    reference = {
        "sgd": lambda: torch.optim.SGD(param_groups(ref, WD), lr=LR, momentum=0.9, nesterov=True),
        "adamw": lambda: torch.optim.AdamW(param_groups(ref, WD), lr=LR, betas=(0.8, 0.99), eps=1e-7),
        "lars": lambda: Lars(_adapted_groups(ref, WD), lr=LR, momentum=0.9, nesterov=True, trust_coeff=0.02, eps=1e-7),
        "lamb": lambda: Lamb(_adapted_groups(ref, WD), lr=LR, betas=(0.8, 0.99), eps=1e-7),
    }[name]()
    assert type(opt) is type(reference)
    _steps(model, opt, 5)
    _steps(ref, reference, 5)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name} {n}: {m}")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), _toy().parameters()))


@pytest.mark.parametrize("wd", [WD, 0.0])
def test_lars_first_step_adapts_weights_only_never_batchnorm_or_biases(wd):
    """MLPerf's LARS: lr x eta ||w|| / (||g|| + wd ||w||) x (g + wd w) on conv/linear weights (with
    weight decay 0 too), plain SGD on BN parameters and biases."""
    model, eta = _toy(), 0.02
    before = copy.deepcopy(model)
    opt = build_optimizer(OptimSpec(name="lars", lr=LR, momentum=0.9, trust_coeff=eta), param_groups(model, wd))
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for (n, p), p0 in zip(model.named_parameters(), before.parameters()):
        g, w = grads[n], p0.detach()
        if p.ndim > 1:
            trust = eta * w.norm() / (g.norm() + wd * w.norm() + 1e-8)
            expected = w - LR * trust * (g + wd * w)
        else:
            expected = w - LR * g
        torch.testing.assert_close(p.detach(), expected, msg=lambda m: f"{n}: {m}")


def test_lamb_first_step_adapts_weights_only():
    """LAMB's first step: u = g / (|g| + eps) (bias-corrected moments) + wd w, scaled by ||w|| / ||u||
    on conv/linear weights; BN parameters and biases take u unscaled. timm clips the global gradient
    norm at 1 first."""
    model, eps = _toy(), 1e-6
    before = copy.deepcopy(model)
    opt = build_optimizer(OptimSpec(name="lamb", lr=LR, betas=(0.9, 0.999), eps=eps), param_groups(model, WD))
    x, y = _batch(0)
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    clip = max(1.0, float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))))
    opt.step()
    for (n, p), p0 in zip(model.named_parameters(), before.parameters()):
        g, w = grads[n] / clip, p0.detach()
        u = g / (g.abs() + eps)
        if p.ndim > 1:
            u = u + WD * w
            u = u * (w.norm() / u.norm())
        torch.testing.assert_close(p.detach(), w - LR * u, msg=lambda m: f"{n}: {m}")


def test_unknown_optimiser_names_the_choices():
    with pytest.raises(ValueError, match="optim.name='adam'.*lamb"):
        build_optimizer(OptimSpec(name="adam", lr=0.1), param_groups(_toy(), 0.0))


# --- losses -------------------------------------------------------------------------------------

S, C = 0.1, 5


def _smooth(target: torch.Tensor) -> torch.Tensor:
    return target * (1 - S) + S / C


@pytest.fixture
def logits_and_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, C, generator=g)
    labels = torch.randint(0, C, (6,), generator=g)
    soft = 0.6 * F.one_hot(labels, C).float() + 0.4 * F.one_hot((labels + 2) % C, C).float()
    return logits, labels, soft


def test_ce_with_index_or_soft_targets_equals_its_formula(logits_and_targets):
    logits, labels, soft = logits_and_targets
    ce = build_loss("ce", S)

    def formula(t):
        return -(_smooth(t) * F.log_softmax(logits, 1)).sum(1).mean()

    torch.testing.assert_close(ce(logits, labels), formula(F.one_hot(labels, C).float()))
    torch.testing.assert_close(ce(logits, soft), formula(soft))
    torch.testing.assert_close(ce(logits, soft.bfloat16()), formula(soft.bfloat16().float()))


def test_bce_with_index_or_soft_targets_equals_its_formula(logits_and_targets):
    """A sigmoid per class, summed over the classes, averaged over the batch; smoothing as ce's."""
    logits, labels, soft = logits_and_targets
    bce = build_loss("bce", S)

    def formula(t):
        t = _smooth(t)
        return -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits)).sum(1).mean()

    torch.testing.assert_close(bce(logits, labels), formula(F.one_hot(labels, C).float()))
    torch.testing.assert_close(bce(logits, soft), formula(soft))
    torch.testing.assert_close(build_loss("bce", 0.0)(logits, soft), -(
        soft * F.logsigmoid(logits) + (1 - soft) * F.logsigmoid(-logits)).sum(1).mean())


def test_losses_hold_no_state_so_old_checkpoints_load():
    for name in LOSSES:
        assert build_loss(name, S).state_dict() == {}
    with pytest.raises(ValueError, match="loss.name='focal'"):
        build_loss("focal")


@pytest.mark.parametrize("loss", LOSSES)
def test_a_fit_on_soft_targets_trains(tmp_path, loss):
    module = Classifier(_tiny_net(), num_classes=4, batch_size=8, optim=OptimSpec(lr=0.256, momentum=0.9),
                        loss=LossSpec(name=loss, label_smoothing=0.1))
    _, trainer = _fit_lrs(tmp_path, module, epochs=1, soft=True)
    assert trainer.global_step == 5 and math.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))


# --- a real fit with each optimiser -------------------------------------------------------------


def _overrides(run_dir, *more):
    return ["data.backend=synthetic", "model.arch=resnet20", "model.num_classes=4", "data.synthetic_size=32",
            "data.batch_size=4", "data.image_size=32", "data.val_resize=32", "trainer.accelerator=cpu",
            "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
            "logger.wandb.mode=disabled", f"run.dir={run_dir}", *more]


@pytest.mark.parametrize("name, more, state_key", [
    ("sgd", ["optim.schedule=step", "optim.milestones=[1]"], "momentum_buffer"),
    ("lars", ["optim.schedule=poly", "optim.lr=1.0", "model.blurpool=true"], "momentum_buffer"),
    ("lamb", ["optim.lr=0.005", "loss.name=bce"], "exp_avg"),
    ("adamw", ["optim.schedule=linear", "optim.lr=0.001", "optim.weight_decay=0.05"], "exp_avg"),
])
def test_a_cpu_fit_runs_two_steps_with_each_optimiser(tmp_path, name, more, state_key):
    run_dir = tmp_path / "run"
    summary = fit(load_config(_overrides(run_dir, f"optim.name={name}", *more)))
    assert summary["global_step"] == 2 and 0 <= summary["val/top1"] <= 1
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["hyper_parameters"]["optim"]["name"] == name
    assert all(state_key in s for s in ckpt["optimizer_states"][0]["state"].values())
    # The checkpoint rebuilds the same network (BlurPool included) and its weights load strictly.
    cfg, _ = load_checkpoint_config(ckpt_path, [])
    module = build_module(cfg, ckpt["hyper_parameters"]["classes"])
    module.load_state_dict(ckpt["state_dict"])
    assert module.hparams.optim["name"] == module.optim_spec.name == name
    assert ("blur" in str(module.model)) == ("model.blurpool=true" in more)


@pytest.mark.slow
def test_cli_fit_with_lamb_bce_blurpool_and_accumulation_on_jpegs(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "data.batch_size=8",
                   "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.accumulate_grad_batches=2",
                   "optim.name=lamb", "optim.lr=0.005", "loss.name=bce", "model.blurpool=true", "optim.schedule=linear",
                   "logger.wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # 4 batches, a step every 2
    assert ckpt["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(0.005 * 8 * 2 / 256)
