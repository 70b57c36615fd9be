"""The CI skip policy (tests/skip_policy.py), run on a small suite of its own in a fresh pytest."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.skip_policy import allowed_skips

REPO = Path(__file__).resolve().parent.parent

SUITE = '''
import pytest

def test_runs():
    pass

def test_needs_dali():
    pytest.skip("NVIDIA DALI is not installed")

@pytest.mark.gpu
def test_on_a_gpu():
    pytest.skip("needs a CUDA GPU")
'''


def _pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.skip_policy", "-p", "no:cacheprovider",
                           "-rs", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_under_ci_a_skip_outside_gpu_fails_the_run_and_is_named(tmp_path):
    proc = _pytest(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.rstrip().splitlines()
    assert "1 test(s) skipped outside -m gpu and not in tests/allowed_skips.txt" in lines[-2]
    assert lines[-1].strip() == "test_suite.py::test_needs_dali: NVIDIA DALI is not installed"
    assert "test_on_a_gpu" not in "\n".join(lines[-2:])  # gpu tests may skip anywhere


def test_without_ci_skips_pass_and_the_last_lines_say_what_was_skipped(tmp_path):
    proc = _pytest(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.rstrip().splitlines()
    assert "1 test(s) skipped outside -m gpu (allowed here; under CI=true they fail the run)" in lines[-2]
    assert lines[-1].strip() == "1 x NVIDIA DALI is not installed"


def test_the_allow_list_needs_a_reason_per_entry(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# comment\n\ntests/test_x.py::test_y  # needs a licence server\n")
    assert allowed_skips(good) == {"tests/test_x.py::test_y": "needs a licence server"}
    bad = tmp_path / "bad.txt"
    bad.write_text("tests/test_x.py::test_y\n")
    with pytest.raises(pytest.UsageError, match="needs a reason"):
        allowed_skips(bad)
    allowed_skips()  # the repository's own list parses
