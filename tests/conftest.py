"""Shared fixtures: small real JPEG trees, and running the real CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Under CI=true a skipped test outside -m gpu fails the run (tests/skip_policy.py).
    from tests.skip_policy import SkipPolicy

    config.pluginmanager.register(SkipPolicy(), "imagenet_trainer_skip_policy")


# The fast tier is `pytest -m "not slow"` (make test-fast). A test without @pytest.mark.slow whose
# setup + call took longer than this is listed at the end of the run, to be marked slow or made
# faster. A list, not a failure: on a shared or loaded machine times vary several-fold. The rule
# that fails is by kind, not by time (tests/test_markers.py: subprocess fits and multi-process runs).
FAST_TEST_BUDGET_S = 10.0
_unmarked_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when in ("setup", "call") and "slow" not in report.keywords:
        _unmarked_seconds[report.nodeid] = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    over = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > FAST_TEST_BUDGET_S), reverse=True)
    if over:
        terminalreporter.write_line(f"{len(over)} test(s) not marked slow took over {FAST_TEST_BUDGET_S:.0f} s "
                                    "(setup + call; a shared fixture counts for its first user): mark them "
                                    "@pytest.mark.slow or make them faster", yellow=True)
        for seconds, nodeid in over:
            terminalreporter.write_line(f"  {seconds:6.1f} s  {nodeid}", yellow=True)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep caches and W&B files out of the user's home: everything under pytest's tmp."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A learnable 10-class tree (the same generator as `imagenet-trainer sample-data`)."""
    from data_pipelines.sample import make_sample_tree

    return make_sample_tree(tmp_path_factory.mktemp("sample"), num_classes=10, train_per_class=120,
                            val_per_class=30, image_size=(48, 40))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A tiny 4-class tree for plumbing tests."""
    from data_pipelines.sample import make_sample_tree

    return make_sample_tree(tmp_path_factory.mktemp("tiny"), num_classes=4, train_per_class=16,
                            val_per_class=5, image_size=(40, 32))


@pytest.fixture(scope="session")
def tiny_pack(tiny_root, tmp_path_factory) -> Path:
    """tiny_root packed by `imagenet-trainer pack` into shards of about 16 KB (64 train images
    in several shards, 20 val images in at least two)."""
    return pack_with_cli(tiny_root, tmp_path_factory.mktemp("tiny_pack") / "pack", "16KB")


def pack_with_cli(root: Path, out: Path, shard_size: str, workers: int = 1) -> Path:
    """`imagenet-trainer pack ROOT OUT` as a user runs it; OUT, once it succeeded."""
    proc = run_cli("pack", str(root), str(out), "--shard-size", shard_size, "--workers", str(workers))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


class Interrupt(Exception):
    """Raised by a test's callback to stop a fit where it has just saved a checkpoint."""


def fit_until_interrupted(tmp_path, record, *, num_classes: int, ckpt_path=None, limit_val_batches=0, **data):
    """A 3-epoch CPU fit of resnet20 on ``ImageNetDataModule(DataSpec(**data))`` with the callback ``record``
    (which may raise :class:`Interrupt` after saving a checkpoint), resumed from ``ckpt_path`` when
    given; seeded, so that two calls train alike. Returns the trainer."""
    import pytorch_lightning as pl

    from data_pipelines.datamodule import ImageNetDataModule
    from data_pipelines.specs import DataSpec
    from trainer.callbacks import AtomicCheckpointIO
    from trainer.recipe.models import build_model
    from trainer.module import Classifier
    from trainer.recipe.specs import OptimSpec

    pl.seed_everything(0)
    dm = ImageNetDataModule(DataSpec(num_workers=1, seed=3, filelist_cache=False, num_classes=num_classes, **data),
                            on_gpu=False)
    module = Classifier(build_model("resnet20", num_classes), num_classes=num_classes, batch_size=dm.batch_size,
                        optim=OptimSpec(lr=0.1, momentum=0.9))
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, callbacks=[record], use_distributed_sampler=False,
                         num_sanity_val_steps=0, limit_val_batches=limit_val_batches, default_root_dir=tmp_path,
                         plugins=[AtomicCheckpointIO()])
    try:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    except Interrupt:
        pass
    return trainer


def skip_without_dali() -> None:
    """Skip the calling test, with DALI's install hint, where DALI does not import."""
    from data_pipelines.dali import dali_available, dali_import_error_message

    if not dali_available():
        pytest.skip(dali_import_error_message())


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `imagenet-trainer ARGS` as a user would (a fresh process: DDP re-runs argv)."""
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONWARNINGS", "ignore")
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Small, fast CPU settings shared by the fit tests: a CIFAR-style net on 32x32 crops.
CPU_FIT = [
    "experiment=smoke",
    "data.backend=torchvision",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
]


class VirtualClock:
    """Stands in for a module's ``time`` (filelist's, staging's) in tests of waits: ``sleep`` only
    moves ``monotonic`` on, so a wait of any length takes no real time, and no load on the machine
    can stretch it or cut it short."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    @staticmethod
    def time() -> float:
        import time

        return time.time()  # the wall-clock stamps of notes and markers stay real
