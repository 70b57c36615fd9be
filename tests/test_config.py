"""Every shipped config composes and validates; bad input exits 2 naming the key."""
from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf

from tests.conftest import run_cli
from trainer.config import ConfigError, conf_dir, experiments, load_config


def _require_key(cfg, key: str) -> None:
    """Raises KeyError naming ``key`` unless the config has it (``OmegaConf.select`` returns None
    for an absent key, even with throw_on_missing: that only concerns ``???`` values)."""
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            raise KeyError(f"config key {key!r} is absent")
        node = node._get_node(part)


def test_the_key_check_fails_on_an_absent_key():
    cfg = load_config(["data.root=/data/imagenet"])
    _require_key(cfg, "data.batch_size")
    _require_key(cfg, "model.num_classes")  # present, with the value None
    for absent in ("data.batchsize", "nope", "data.batch_size.x"):
        with pytest.raises(KeyError, match=absent.replace(".", r"\.")):
            _require_key(cfg, absent)


def test_base_config_composes_with_every_key_users_rely_on():
    cfg = load_config(["data.root=/data/imagenet"])
    for key in ("data.root", "data.backend", "data.batch_size", "data.image_size", "data.val_resize",
                "data.num_workers", "model.arch", "model.num_classes", "optim.lr", "optim.warmup_epochs",
                "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                "trainer.precision", "run.dir", "seed"):
        _require_key(cfg, key)


@pytest.mark.parametrize("name", experiments())
def test_every_experiment_composes(name):
    cfg = load_config([f"experiment={name}", "data.root=/data/imagenet"])
    assert cfg.experiment == name


def test_every_yaml_under_conf_is_an_experiment_or_the_base():
    files = {p.relative_to(conf_dir()).as_posix() for p in conf_dir().rglob("*.yaml")}
    assert files == {"config.yaml"} | {f"experiment/{n}.yaml" for n in experiments()}


def test_rn50_90ep_is_nvidias_recipe():
    cfg = load_config(["experiment=rn50_90ep", "data.root=/x"])
    assert cfg.optim.momentum == 0.875 and cfg.optim.lr == 0.256
    assert cfg.optim.weight_decay == 3.0517578125e-05 and cfg.optim.label_smoothing == 0.1
    assert cfg.optim.warmup_epochs == 8 and cfg.trainer.max_epochs == 90
    assert cfg.data.batch_size == 256 and cfg.trainer.precision == "bf16-mixed"


def test_overrides_apply_in_order():
    cfg = load_config(["experiment=smoke", "data.root=/x", "model.arch=resnet101", "data.batch_size=128"])
    assert cfg.model.arch == "resnet101" and cfg.data.batch_size == 128
    assert cfg.data.image_size == 32  # from the smoke recipe


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.batchsize=3", ["data.batchsize", "data.batch_size"]),
        ("modl.arch=resnet18", ["modl", "model"]),
        ("data.batch_size=abc", ["data.batch_size", "abc"]),
        ("model.arch=vgg16", ["model.arch", "resnet50", "plain18"]),
        ("data.backend=opencv", ["data.backend", "dali_cpu"]),
        ("experiment=nope", ["experiment", "smoke"]),
        ("trainer.precision=8", ["trainer.precision", "bf16-mixed"]),
        ("data.val_resize=10", ["data.val_resize", "data.image_size"]),
        ("optim.name=adam", ["optim.name", "sgd", "lars", "lamb", "adamw"]),
        ("optim.schedule=exp", ["optim.schedule", "cosine", "linear", "step", "poly"]),
        ("loss.name=focal", ["loss.name", "ce", "bce"]),
        ("trainer.accumulate_grad_batches=0", ["trainer.accumulate_grad_batches"]),
        ("noequals", ["key=value"]),
    ],
)
def test_bad_override_fails_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(["data.root=/x", override])
    for word in words:
        assert word in str(info.value)


@pytest.mark.slow
def test_cli_exits_2_on_a_misspelt_key_before_anything_heavy(tmp_path):
    proc = run_cli("fit", "data.root=/nonexistent", "optim.learning_rate=0.1", f"run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "optim.learning_rate" in proc.stderr and "optim.lr" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_missing_data_root_exits_2(tmp_path):
    proc = run_cli("fit", f"run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2
    assert "data.root" in proc.stderr


@pytest.mark.slow
def test_cli_bad_tree_exits_2_naming_the_folder(tmp_path):
    (tmp_path / "train").mkdir()
    proc = run_cli("fit", "experiment=smoke", f"data.root={tmp_path}", f"run.dir={tmp_path}/run", timeout=120)
    assert proc.returncode == 2
    assert str(tmp_path / "train") in proc.stderr


@pytest.mark.slow
def test_print_config_prints_resolved_yaml():
    proc = run_cli("print-config", "experiment=smoke", "data.root=/data", "model.arch=plain34", timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.arch == "plain34" and cfg.run.dir == "runs/smoke" and cfg.data.root == "/data"


def test_submit_leaves_the_jobs_environment_to_the_job(tmp_path, monkeypatch, capsys):
    """The staging pattern of docs/clusters.md on a login node without TMPDIR: submit checks every other key,
    and the rendered script keeps the interpolation for the job's nodes to resolve."""
    from trainer.cli import main

    monkeypatch.delenv("TMPDIR", raising=False)
    job = ["submit", "--dry-run", "--nodes", "1", "--gpus-per-node", "2", "--time", "1:00:00"]
    assert main([*job, "data.root=/x", "data.stage_to=${oc.env:TMPDIR}"]) == 0
    assert "'data.stage_to=${oc.env:TMPDIR}'" in capsys.readouterr().out
    # Only what the job can give is deferred: a misspelt key still fails here.
    assert main([*job, "data.root=/x", "data.stage_to=${oc.env:TMPDIR}", "data.batchsize=3"]) == 2
    assert "data.batchsize" in capsys.readouterr().err
    # Outside submit the config is this host's: the unset variable is an error naming it.
    with pytest.raises(ConfigError, match="TMPDIR"):
        load_config(["data.root=/x", "data.stage_to=${oc.env:TMPDIR}"])


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("0.25", 0.25), ("1.0", 1.0), ("0", 0)])
def test_batch_limits_keep_lightnings_int_count_and_float_fraction(value, expected):
    """trainer.limit_val_batches=1 is one batch (an int), 1.0 all of them: the type reaches the Trainer."""
    from trainer.run import _settings

    cfg = load_config(["data.root=/x", f"trainer.limit_val_batches={value}", f"trainer.limit_train_batches={value}"])
    settings = _settings(cfg.trainer)
    for key in ("limit_val_batches", "limit_train_batches"):
        assert settings[key] == expected and type(settings[key]) is type(expected), (key, settings[key])


@pytest.mark.parametrize("value", ["1.5", "-1", "abc", "true"])
def test_a_bad_batch_limit_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"trainer\.limit_val_batches"):
        load_config(["data.root=/x", f"trainer.limit_val_batches={value}"])


def _yaml_leaves() -> dict:
    from trainer.config import _leaves

    return dict(_leaves(OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml"), resolve=False)))


def test_config_yaml_states_every_schema_default_and_no_other_value():
    """A default lives in one place: config.yaml writes out the schema's (trainer/config.py), key for
    key, so the two cannot drift apart; a new schema key must be documented there too."""
    from trainer.config import _leaves, schema

    defaults = dict(_leaves(OmegaConf.to_container(schema(), resolve=False)))
    stated = _yaml_leaves()
    assert sorted(stated) == sorted(defaults)
    # 1 == True in Python: a bool must be stated as a bool.
    differ = {k: (v, defaults[k]) for k, v in stated.items()
              if v != defaults[k] or isinstance(v, bool) != isinstance(defaults[k], bool)}
    assert differ == {}


def test_every_key_of_config_yaml_has_a_comment():
    """config.yaml is the documentation of the keys: each leaf's line says what it does."""
    leaves = {k.rsplit(".", 1)[-1] for k in _yaml_leaves()}
    lines = (conf_dir() / "config.yaml").read_text().splitlines()
    bare = [line for line in lines
            if ":" in line and not line.lstrip().startswith("#") and line.split(":", 1)[0].strip() in leaves
            and line.split(":", 1)[1].strip() and "#" not in line]
    assert bare == []


def test_the_specs_are_built_from_the_config_once():
    from data_pipelines.specs import AugSpec, DataSpec
    from trainer.config import aug_spec, data_spec, loss_spec, mix_spec, optim_spec, schedule_spec
    from trainer.recipe.specs import LossSpec, MixSpec, OptimSpec, ScheduleSpec

    cfg = load_config(["data.root=/x", "optim.name=lamb", "optim.betas=[0.8,0.9]", "optim.schedule=step",
                       "loss.name=bce", "aug.mixup_alpha=0.2", "aug.crop=pad_crop", "data.progressive.start_size=160",
                       "data.progressive.end_size=192", "data.progressive.start_epoch=0", "data.progressive.end_epoch=10"])
    assert optim_spec(cfg) == OptimSpec(name="lamb", lr=0.256, momentum=0.875, betas=(0.8, 0.9),
                                        weight_decay=3.0517578125e-05)
    assert schedule_spec(cfg) == ScheduleSpec(name="step", warmup_epochs=8.0)
    assert loss_spec(cfg) == LossSpec(name="bce", label_smoothing=0.1)
    assert mix_spec(cfg) == MixSpec(mixup_alpha=0.2)
    assert aug_spec(cfg) == AugSpec(crop="pad_crop")
    data = data_spec(cfg)
    assert isinstance(data, DataSpec) and (data.root, data.batch_size, data.seed) == ("/x", 256, 0)
    assert data.resolution.start_size == 160 and data.resolution.end_epoch == 10
