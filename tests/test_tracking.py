"""W&B tracking: real offline runs written by `imagenet-trainer fit`, read back with
`wandb leet inspect --json`; mode resolution; a DDP job makes one run; W&B off or absent still trains."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CPU_FIT, run_cli
from trainer.tracking import RUN_ID_FILE, default_group, has_api_key, read_run_id, resolve_mode

# The metrics the issue promises in the run (besides the config).
METRIC_KEYS = {
    "train/loss_step", "train/top1_step", "train/loss_epoch", "train/top1_epoch", "val/top1", "val/top5",
    "lr", "perf/images_per_sec", "perf/images_per_sec_total", "perf/data_wait_frac", "perf/epoch_time_s",
}


# --- mode resolution (pure) ------------------------------------------------------------------


@pytest.mark.parametrize(
    "configured, environ, expected, why",
    [
        ("online", {"WANDB_API_KEY": "k" * 40}, "online", ""),
        ("online", {}, "offline", "API key"),
        ("online", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}, "offline", "WANDB_MODE=offline"),
        ("online", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "dryrun"}, "offline", "WANDB_MODE=dryrun"),
        ("online", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "disabled"}, "disabled", "WANDB_MODE=disabled"),
        ("offline", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "online"}, "offline", ""),
        ("disabled", {"WANDB_API_KEY": "k" * 40}, "disabled", ""),
    ],
)
def test_resolve_mode(configured, environ, expected, why, tmp_path):
    mode, reason = resolve_mode(configured, environ, netrc_path=tmp_path / "no-netrc")
    assert mode == expected
    assert why in reason if why else reason == ""


def test_api_key_from_netrc_for_the_configured_host(tmp_path):
    rc = tmp_path / "netrc"
    rc.write_text("machine wandb.example.org\n  login user\n  password " + "p" * 40 + "\n")
    rc.chmod(0o600)
    assert not has_api_key({}, rc)  # default host api.wandb.ai has no entry
    assert has_api_key({"WANDB_BASE_URL": "https://wandb.example.org"}, rc)
    assert resolve_mode("online", {"WANDB_BASE_URL": "https://wandb.example.org"}, rc)[0] == "online"


def test_bad_mode_names_the_key():
    with pytest.raises(ValueError, match="logger.wandb.mode"):
        resolve_mode("sometimes", {})


def test_group_is_the_slurm_job_id_unless_set():
    assert default_group(None, {"SLURM_JOB_ID": "4242"}) == "4242"
    assert default_group(None, {"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4200"}) == "4200"
    assert default_group("sweep-a", {"SLURM_JOB_ID": "4242"}) == "sweep-a"
    assert default_group(None, {}) is None


# --- real offline runs -----------------------------------------------------------------------


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    """As on a fresh cluster account: no WANDB_MODE, no API key, no netrc entry."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def inspect(run: Path) -> list[dict]:
    """Every record of an offline run, as `wandb leet inspect --json` prints them."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def history(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def config_of(records: list[dict]) -> dict:
    """The run's config: its first record's, then every update, merged (as W&B shows it)."""
    config: dict = {}
    for r in records:
        if r["type"] == "run":
            _merge(config, r["run"].get("config", {}).get("update", {}))
        elif r["type"] == "config":
            _merge(config, r["config"].get("update", {}))
    return config


def csv_points(run_dir: Path) -> dict[str, dict[int, float]]:
    points: dict[str, dict[int, float]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value:
                    points.setdefault(key, {})[int(row["step"])] = float(value)
    return points


def wandb_points(rows: list[dict]) -> dict[str, dict[int, float]]:
    """The scalar metrics of W&B history rows, per key and step (images, such as the training
    grid ``samples``, are records, not numbers: see ``wandb_images``)."""
    points: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and key not in ("trainer/global_step", "epoch") and key not in wandb_images(row):
                assert isinstance(value, (int, float)), (key, value)
                points.setdefault(key, {})[int(row["trainer/global_step"])] = float(value)
    return points


def wandb_images(row: dict) -> set[str]:
    """The keys of ``row`` that belong to a logged image: its record is flattened into
    ``NAME._type`` ("images/separated"), ``NAME.captions`` and so on."""
    names = {key[: -len("._type")] for key, value in row.items()
             if key.endswith("._type") and str(value).startswith("image")}
    return {key for key in row if any(key.startswith(f"{name}.") for name in names)}


@pytest.mark.slow
def test_offline_run_holds_config_and_metrics_and_a_resumed_fit_continues_it(tiny_root, tmp_path, no_wandb_credentials):
    run_dir = tmp_path / "run"
    # 64 images / batch 8 = 8 steps; logging every 2 steps puts train rows at steps 1, 3, 5, 7.
    args = [*CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "data.batch_size=8",
            "trainer.log_every_n_steps=2", "logger.wandb.group=grp-a", "logger.wandb.tags=[smoke,ci]"]
    first = run_cli("fit", *args, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    # Said once, with what to do about it.
    assert first.stderr.count("no W&B API key") == 1 and "wandb sync" in first.stderr

    (run,) = offline_runs(run_dir)
    run_id = read_run_id(run_dir)
    assert run_id and run.name.endswith(run_id)
    records = inspect(run)
    (header,) = [r["run"] for r in records if r["type"] == "run"]
    assert header["run_id"] == run_id and header["run_group"] == "grp-a" and header["tags"] == ["smoke", "ci"]

    config = config_of(records)
    assert config["model"]["arch"] == "resnet20" and config["data"]["batch_size"] == 8
    assert config["model"]["num_classes"] == 4  # filled in from the data, not the null of the YAML
    assert config["data"]["root"] == str(tiny_root) and config["experiment"] == "smoke"
    assert config["logger"]["wandb"]["group"] == "grp-a"

    assert not [r for r in records if r["type"] == "artifact"]  # artifacts are for online runs only

    rows = history(records)
    points = wandb_points(rows)
    assert METRIC_KEYS <= set(points)
    # The grid of training images (RUN_DIR/samples.png) is logged too, once, at the fit's start.
    assert sum(bool(wandb_images(row)) for row in rows) == 1, [sorted(wandb_images(r)) for r in rows]
    assert sorted(points["train/loss_step"]) == [1, 3, 5, 7]
    assert sorted(points["perf/images_per_sec"]) == [1, 3, 5, 7]
    assert sorted(points["val/top1"]) == sorted(points["perf/epoch_time_s"]) == [7]
    # The same values at the same steps as the local CSV: one source, two sinks.
    local = csv_points(run_dir)
    for key in METRIC_KEYS:
        assert sorted(points[key]) == sorted(local[key]), key
        for step, value in points[key].items():
            assert math.isclose(value, local[key][step], rel_tol=1e-6), (key, step)

    second = run_cli("fit", *args, "trainer.max_epochs=2", "run.allow_resume_change=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert read_run_id(run_dir) == run_id
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    resumed = [r for r in runs if r != run][0]
    rows = history(inspect(resumed))
    assert sorted(wandb_points(rows)["train/loss_step"]) == [9, 11, 13, 15]  # global steps continue


@pytest.mark.slow
def test_two_process_ddp_job_makes_exactly_one_run(tiny_root, tmp_path, no_wandb_credentials):
    run_dir = tmp_path / "ddp"
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "trainer.devices=2",
                   "data.batch_size=6", "trainer.log_every_n_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("no W&B API key") == 1  # rank 1 says nothing
    (run,) = offline_runs(run_dir)
    wandb_dirs = [p for p in tmp_path.rglob("offline-run-*")]
    assert wandb_dirs == [run]
    rows = [r for r in history(inspect(run)) if "perf/images_per_sec" in r]
    assert rows
    for row in rows:  # logged by rank 0 for the whole job: its rate plus rank 1's (tests/test_metrics.py
        # checks the sum exactly; rank 1's own rate is not in the run)
        assert row["perf/images_per_sec_total"] > row["perf/images_per_sec"] > 0


@pytest.mark.slow
def test_disabled_mode_trains_and_writes_no_wandb_files(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "data.batch_size=16",
                   "logger.wandb.mode=disabled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run_dir / "wandb").exists() and not (run_dir / RUN_ID_FILE).exists()
    assert "val/top1" in (run_dir / "metrics.csv").read_text()


@pytest.mark.slow
def test_training_without_wandb_installed_only_warns(tiny_root, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # Imported at start-up by `site`: every `import wandb` now fails as if it were not installed.
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoWandb:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'wandb' or name.startswith('wandb.'):\n"
        "            raise ImportError(f'No module named {name!r} (hidden by the test)')\n"
        "sys.meta_path.insert(0, _NoWandb())\n"
    )
    env = {"PYTHONPATH": str(shim)}
    check = subprocess.run([sys.executable, "-c", "import wandb"], env={**__import__("os").environ, **env},
                           capture_output=True, text=True)
    assert check.returncode != 0 and "hidden by the test" in check.stderr

    run_dir = tmp_path / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "data.batch_size=16", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("wandb package is not installed") == 1
    assert not (run_dir / "wandb").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and "val/top1" in (run_dir / "metrics.csv").read_text()


@pytest.mark.slow
def test_unreachable_server_falls_back_to_an_offline_run(tmp_path, monkeypatch):
    """An API key, but nothing listens at the server's address: the logger still works, offline."""
    import wandb

    from trainer.tracking import build_wandb_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    run_dir = tmp_path / "run"
    logger = build_wandb_logger(run_dir=run_dir, project="p", entity=None, name=None, group=None, tags=[],
                                mode="online", log_model=True, config={"model": {"arch": "resnet50"}})
    assert logger is not None and logger._wandb_init["mode"] == "online"
    assert logger._log_model is True  # online runs upload checkpoints as artifacts
    try:
        logger.log_metrics({"train/loss_step": 1.5}, step=3)
        assert logger._wandb_init["mode"] == "offline" and logger._log_model is False
        logger.finalize("success")
    finally:
        wandb.finish()
    (run,) = offline_runs(run_dir)
    records = inspect(run)
    assert config_of(records)["model"] == {"arch": "resnet50"}
    assert [r["train/loss_step"] for r in history(records)] == [1.5]
    assert run.name.endswith(read_run_id(run_dir))
