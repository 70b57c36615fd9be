"""Choosing the data backend: auto, explicit, and DALI missing."""
from __future__ import annotations

import json

import pytest

from data_pipelines.datamodule import BackendError, resolve_backend
from tests.conftest import CPU_FIT, run_cli


def test_auto_picks_dali_cpu_on_a_machine_with_dali_and_no_gpu():
    pytest.importorskip("nvidia.dali")
    assert resolve_backend("auto", on_gpu=False) == "dali_cpu"
    assert resolve_backend("auto", on_gpu=True) == "dali_gpu"


@pytest.mark.slow
def test_dali_gpu_without_a_gpu_fails_at_start_saying_what_to_use(tiny_root, tmp_path):
    with pytest.raises(BackendError, match="dali_cpu"):
        resolve_backend("dali_gpu", on_gpu=False)
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={tmp_path}/run", "data.backend=dali_gpu",
                   timeout=120)
    assert proc.returncode == 2 and "data.backend=dali_gpu needs a CUDA GPU" in proc.stderr


@pytest.mark.slow
def test_auto_falls_back_to_torchvision_when_dali_cannot_be_imported(tiny_root, tmp_path):
    shim = tmp_path / "shim"
    (shim / "nvidia" / "dali").mkdir(parents=True)
    (shim / "nvidia" / "__init__.py").write_text("")
    (shim / "nvidia" / "dali" / "__init__.py").write_text("raise ImportError('DALI hidden by the test')\n")
    env = {"PYTHONPATH": str(shim)}
    run_dir = tmp_path / "run"
    proc = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={run_dir}", "data.backend=auto",
                   "data.batch_size=8", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.backend=auto chose torchvision" in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["backend"] == "torchvision"
    explicit = run_cli("fit", *CPU_FIT, f"data.root={tiny_root}", f"run.dir={tmp_path}/r2", "data.backend=dali_cpu",
                       env=env, timeout=120)
    assert explicit.returncode == 2 and "pip install 'imagenet-trainer[dali]'" in explicit.stderr
